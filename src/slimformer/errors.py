"""Errors a user can fix. The CLI prints their message on one line and exits with code 2."""


class SlimformerError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class AssetMissing(SlimformerError):
    """An offline model or data set is not installed; the message names the install command."""

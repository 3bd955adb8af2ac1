"""Stopping a distillation that falls behind: the held-out loss the Distill pass reports every
few steps (from the build child: `child.report_value`) goes to Optuna's MedianPruner, which
stops the trial when its loss at a step is worse than the median of the finished
distillations' at that step. The trial is then pruned with its last value; surviving trials
train on. (Staged scoring, the other early stop, is tasks/staging.py.)

Optuna's `Trial.report` and `should_prune` serve single-objective studies only, and the study
has two objectives; so the values go to a companion single-objective study in the same storage
(`DISTILL_STUDY`), one trial there for each distilling trial (its number in a user attribute),
whose pruner decides. Kept in the storage, it resumes and is shared by workers as the study is.

Why the median and not successive halving: a study runs tens of trials, not hundreds, few of
them distill, and they stop at different step budgets (50 to 400); successive halving keeps
only the top third at each rung whatever the budget, which at this scale stops most
distillations on the noise of one rung. The median stops only students further from their
teacher than half the finished ones were at the same step, after warm-up steps (the loss at
step 0 is the pruned structure's, before any recovery) and once a few distillations have
finished to compare with.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from slimformer.search.storage import open_storage

DISTILL_STUDY = "slimformer-distill"
WARMUP_STEPS = 50  # no stop before this many steps: the first steps recover the most
STARTUP_TRIALS = 3  # finished distillations before any is stopped


def distill_study(storage_url: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=DISTILL_STUDY,
        storage=open_storage(storage_url),
        direction="minimize",
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=STARTUP_TRIALS,
            n_warmup_steps=WARMUP_STEPS,
            n_min_trials=STARTUP_TRIALS,
        ),
        load_if_exists=True,
    )


class DistillWatch:
    """One distilling trial's intermediate values, relayed to the pruner; called with each
    (step, held-out loss), it returns the reason to stop, or None."""

    def __init__(self, study: optuna.Study, number: int):
        self.study = study
        self.trial = study.ask()
        self.trial.set_user_attr("trial", number)
        self.last: tuple[int, float] | None = None
        self.stopped = False

    def __call__(self, step: int, value: float) -> str | None:
        self.last = (step, value)
        self.trial.report(value, step)
        if not self.trial.should_prune():
            return None
        self.stopped = True
        return (
            f"distillation stopped at step {step}: its held-out loss {value:.4g} is worse than "
            "the median of the finished distillations' at that step"
        )

    def close(self, built: bool) -> None:
        """Tell the companion trial how it ended: pruned, finished (with its last value, which
        later trials are compared against), or failed."""
        if self.stopped:
            self.study.tell(self.trial, state=TrialState.PRUNED)
        elif built and self.last is not None:
            self.study.tell(self.trial, self.last[1])
        else:
            self.study.tell(self.trial, state=TrialState.FAIL)

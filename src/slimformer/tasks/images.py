"""A labelled image folder (one sub-folder per class, as torchvision's ImageFolder reads it),
checked whole before any work: readable images, one size, at least two classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimformer.errors import SlimformerError

SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


@dataclass(frozen=True)
class ImageFolder:
    root: Path
    classes: tuple[str, ...]  # the sub-folders' names, sorted
    files: tuple[tuple[Path, int], ...]  # (image, index into classes), sorted by path
    size: tuple[int, int]  # (width, height), the same for every image


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise SlimformerError(
            "reading images needs Pillow, which is not installed: run `pip install pillow`"
        ) from None
    return Image


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def scan_image_folder(root: str | Path) -> ImageFolder:
    """The folder's classes and images, every image opened to check it reads and its size."""
    Image = _pil()
    root = Path(root)
    if not root.is_dir():
        raise SlimformerError(
            f"--data {root} is not a folder; the image task reads a folder with one sub-folder "
            "of images per class"
        )
    classes, files = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p)):
        images = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and _visible(p) and p.suffix.lower() in SUFFIXES
        )
        if images:
            files += [(image, len(classes)) for image in images]
            classes.append(folder.name)
    if not files:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in SUFFIXES]
        where = f" ({len(loose)} lie in {root} itself)" if loose else ""
        raise SlimformerError(
            f"no images found in class sub-folders of {root}{where}; put each class's images "
            f"({', '.join(sorted(s[1:] for s in SUFFIXES))}) in a sub-folder named after it"
        )
    if len(classes) < 2:
        raise SlimformerError(
            f"{root} holds one class ({classes[0]}); classification needs at least two class "
            "sub-folders with images"
        )
    sizes: dict[tuple[int, int], Path] = {}
    for path, _ in files:
        try:
            with Image.open(path) as image:
                size = image.size
                image.load()  # decodes it all: a truncated file fails here, not mid-study
        except Exception as error:  # Pillow raises many types for a damaged file
            raise SlimformerError(
                f"cannot read image {path} ({type(error).__name__}: {error}); remove or replace it"
            ) from None
        sizes.setdefault(size, path)
        if len(sizes) > 1:
            (a, first), (b, second) = list(sizes.items())[:2]
            raise SlimformerError(
                f"images differ in size: {first} is {a[0]}x{a[1]}, {second} is {b[0]}x{b[1]}; "
                "resize them all to the model's input size"
            )
    return ImageFolder(root, tuple(classes), tuple(files), next(iter(sizes)))


def read_image(path: Path, channels: int) -> np.ndarray:
    """uint8 pixels [height, width, channels], converted to grey (1 channel) or RGB (3)."""
    Image = _pil()
    try:
        with Image.open(path) as image:
            converted = image.convert("L" if channels == 1 else "RGB")
            pixels = np.asarray(converted, dtype=np.uint8)
    except Exception as error:
        raise SlimformerError(
            f"cannot read image {path} ({type(error).__name__}: {error}); remove or replace it"
        ) from None
    return pixels[:, :, None] if pixels.ndim == 2 else pixels

"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (28x28 grey images, 10 classes,
60,000 training and 10,000 test images), and scikit-learn's 8x8 digits for fast checks.

The package installs its IDX files under /usr/share/datasets/fashion-mnist. Without root it is
fetched with `apt-get download` and unpacked with `dpkg-deb -x` into the cache instead (what
`make assets` does), so no system change is needed.
"""

from __future__ import annotations

import functools
import gzip
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from slimformer.assets.cache import data_dir
from slimformer.errors import AssetMissing

PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = (
    f"slimformer assets install fashion-mnist (unpacks `apt-get download {PACKAGE}` into the "
    f"cache), or apt-get install {PACKAGE}"
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = (
    "T-shirt-top",  # "T-shirt/top" in the data set's README; a folder name cannot hold "/"
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _cached_dir() -> Path:
    return data_dir() / "fashion-mnist"


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in _FILES.values() for name in pair)


def fashion_mnist_dir() -> Path | None:
    """The folder holding the four IDX files (the system package's, else the cache's)."""
    for folder in (SYSTEM_DIR, _cached_dir()):
        if _complete(folder):
            return folder
    return None


def install_fashion_mnist() -> Path:
    """Find the data, or unpack the Debian package into the cache; the folder's path."""
    found = fashion_mnist_dir()
    if found is not None:
        return found
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise AssetMissing(
            f"Fashion-MNIST is not installed and this is no Debian system: "
            f"place the four *-ubyte.gz files in {_cached_dir()}"
        )
    target = _cached_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fashion-mnist-", dir=target.parent) as tmp:
        work = Path(tmp)
        download = subprocess.run(
            ["apt-get", "download", PACKAGE], cwd=work, capture_output=True, text=True
        )
        debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
        if download.returncode != 0 or not debs:
            reason = (download.stderr.strip().splitlines() or ["no .deb fetched"])[-1]
            raise AssetMissing(f"Fashion-MNIST is not installed ({reason}): {FASHION_INSTALL}")
        unpacked = work / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        folder = unpacked / SYSTEM_DIR.relative_to("/")
        if not _complete(folder):
            raise AssetMissing(f"{debs[0].name} lacks the IDX files: {FASHION_INSTALL}")
        staged = work / "fashion-mnist"
        staged.mkdir()
        for pair in _FILES.values():
            for name in pair:
                shutil.copyfile(folder / name, staged / name)
        shutil.rmtree(target, ignore_errors=True)
        staged.replace(target)
    return target


def fashion_mnist_status() -> tuple[bool, str]:
    found = fashion_mnist_dir()
    return (True, str(found)) if found else (False, "")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: magic, dimension sizes, then the bytes), decompressed.
    Read here because it is 10 lines; the libraries that read it fetch from the network."""
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


@functools.lru_cache(maxsize=2)
def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels int64 [n]) of the 'train' or 'test' split."""
    folder = install_fashion_mnist()
    images, labels = _FILES[split]
    return _read_idx(folder / images), _read_idx(folder / labels).astype(np.int64)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (shipped in its wheel) as uint8 images [n, 8, 8]."""
    from sklearn.datasets import load_digits

    loaded = load_digits()
    images = np.round(loaded.images * (255 / 16)).astype(np.uint8)
    return images, loaded.target.astype(np.int64)

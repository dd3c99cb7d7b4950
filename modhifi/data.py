"""Datasets and their fixed, seeded splits: train, calibration (held out, used unlabeled), test.

Images are kept as uint8 tensors (N, C, H, W) and normalised per batch, so a whole split of
Fashion-MNIST costs 55 MB. The calibration split is carved out of the official training split
with a fixed seed, so it never overlaps the test split and never changes between runs.

Specs understood by `load_dataset`: `fashion-mnist`, `digits`, `cifar10:DIR`, `imagefolder:DIR`.
"""
from __future__ import annotations

import gzip
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modhifi.batch import to_device
from modhifi.errors import UserError

SPLIT_SEED = 20251125

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class Split:
    """One split: uint8 images (N, C, H, W) and int64 labels (N,). The images of an image
    folder are `ImageFiles`, read batch by batch."""

    images: torch.Tensor | ImageFiles
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | slice) -> "Split":
        return Split(self.images[index], self.labels[index], self.mean, self.std)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float32 (B, C, H, W)."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def batches(self, batch_size: int, *, device: torch.device | str = "cpu",
                labels: bool = False) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Normalised image batches in order (with labels when asked)."""
        for start in range(0, len(self), batch_size):
            x = self.normalise(self.images[start:start + batch_size].to(device))
            yield (x, self.labels[start:start + batch_size].to(device)) if labels else x


class Batches(Sequence):
    """A split's normalised batches, made again each time they are read: what an analysis keeps
    instead of the images, so that every pass over a calibration set on disk (`ImageFiles`:
    the statistics, then BatchNorm recalibration after pruning) streams it batch by batch and a
    folder larger than memory works. In-memory splits are only sliced and normalised again.

    Args:
        split: the images (their labels are not read).
        batch_size: images per batch (the last batch may be smaller).
        device: where each batch is made.
    """

    def __init__(self, split: Split, batch_size: int, *, device: torch.device | str = "cpu"):
        self.split, self.batch_size, self.device = split, batch_size, device

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def __getitem__(self, i: int) -> torch.Tensor:  # (B, C, H, W)
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        start = (i % len(self)) * self.batch_size
        return next(self.split.subset(slice(start, start + self.batch_size)).batches(
            self.batch_size, device=self.device))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.split.batches(self.batch_size, device=self.device)


def reusable(calibration, device: torch.device | str):
    """Batches that can be read more than once: `Batches` as they are (read again each time),
    anything else (a list, a generator) held in memory on `device`."""
    if isinstance(calibration, Batches):
        return calibration
    return tuple(to_device(batch, device) for batch in calibration)


@dataclass(frozen=True)
class Dataset:
    """A dataset with its three disjoint splits."""

    name: str  # the spec it was loaded from: `load_dataset(name)` loads it again
    classes: tuple[str, ...]
    train: Split
    calibration: Split
    test: Split

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.test.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def caveats(self) -> tuple[str, ...]:
        """Warnings for data that is legal but makes the accuracies meaningless."""
        present = int(self.test.labels.unique().numel())
        if present > 1:
            return ()
        return (f"the test split of {self.name} holds only {present} class: every accuracy on it "
                "is trivially high or low; use a dataset with several classes",)


def load_dataset(spec: str, *, data_dir: str | Path | None = None,
                 calibration_size: int | None = None) -> Dataset:
    """Load a dataset by spec and split it deterministically.

    Args:
        spec: `fashion-mnist`, `digits`, `cifar10:DIR` or `imagefolder:DIR`.
        data_dir: where to look first for Fashion-MNIST's IDX files (else `MODHIFI_DATA_DIR`).
        calibration_size: images held out of the training split for calibration
            (default: 5,000 for Fashion-MNIST and CIFAR-10, 20% of the rest).
    Returns:
        The Dataset; raises UserError naming what was looked for when it cannot be found.
    """
    kind, _, path = spec.partition(":")
    if kind == "fashion-mnist":
        train, test = _fashion_mnist(data_dir)
        return _split("fashion-mnist", FASHION_CLASSES, train, test, calibration_size or 5000,
                      mean=(0.2860,), std=(0.3530,))
    if kind == "digits":
        return _digits(calibration_size)
    if kind == "cifar10" and path:
        train, test = _cifar10(Path(path))
        return _split(spec, CIFAR10_CLASSES, train, test, calibration_size or 5000,
                      mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    if kind == "imagefolder" and path:
        return _imagefolder(Path(path), calibration_size)
    raise UserError(f"unknown dataset {spec!r}: use fashion-mnist, digits, cifar10:DIR or "
                    "imagefolder:DIR")


def _split(name, classes, train, test, calibration_size, *, mean, std) -> Dataset:
    """Carve a seeded calibration split out of (images, labels) `train`."""
    images, labels = train
    if not 0 < calibration_size < len(labels):
        raise UserError(f"calibration size {calibration_size} must be between 1 and "
                        f"{len(labels) - 1} for {name}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    calib, rest = order[:calibration_size].sort().values, order[calibration_size:].sort().values
    full = Split(images, labels, mean, std)
    return Dataset(name, tuple(classes), full.subset(rest), full.subset(calib),
                   Split(test[0], test[1], mean, std))


# --- Fashion-MNIST -----------------------------------------------------------------------------

def fashion_mnist_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Directories searched for Fashion-MNIST's IDX files, in order."""
    dirs = [Path(d) for d in (data_dir, os.environ.get("MODHIFI_DATA_DIR")) if d]
    return dirs + [DEBIAN_FASHION_DIR, cache_root() / "FashionMNIST" / "raw"]


def cache_root() -> Path:
    """Where downloads and measurements are kept: $MODHIFI_CACHE, else ~/.cache/modhifi."""
    return Path(os.environ.get("MODHIFI_CACHE", Path.home() / ".cache" / "modhifi"))


def _fashion_mnist(data_dir) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    for folder in fashion_mnist_dirs(data_dir):
        if _find_idx(folder, FASHION_FILES["train"][0]):
            return tuple(_read_pair(folder, *FASHION_FILES[s]) for s in ("train", "test"))
    _download_fashion_mnist()
    return tuple(_read_pair(cache_root() / "FashionMNIST" / "raw", *FASHION_FILES[s])
                 for s in ("train", "test"))


def _download_fashion_mnist() -> None:
    """Last resort for online users: torchvision's downloader into our cache."""
    looked = ", ".join(str(d) for d in fashion_mnist_dirs())
    try:
        from torchvision.datasets import FashionMNIST
        FashionMNIST(str(cache_root()), train=True, download=True)
        FashionMNIST(str(cache_root()), train=False, download=True)
    except Exception as error:  # offline, proxy, disk: all mean the same to the user
        raise UserError(f"Fashion-MNIST not found (looked in {looked}) and the download failed "
                        f"({type(error).__name__}): install the Debian package "
                        "dataset-fashion-mnist or set MODHIFI_DATA_DIR to a folder with its "
                        "IDX files") from None


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_pair(folder: Path, images_stem: str, labels_stem: str):
    paths = [_find_idx(folder, s) for s in (images_stem, labels_stem)]
    if None in paths:
        raise UserError(f"{folder} has {images_stem} or {labels_stem} missing: "
                        "give a folder with all four Fashion-MNIST IDX files")
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{paths[0]} and {paths[1]} do not form an image/label pair "
                        f"(shapes {tuple(images.shape)} and {tuple(labels.shape)})")
    return images.unsqueeze(1), labels.long()


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (optionally gzipped) of unsigned bytes into a uint8 tensor."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise UserError(f"cannot read {path} ({error}): re-install or re-download it") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes: check the file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated ({body.size} of {int(np.prod(dims))} bytes): "
                        "re-install or re-download it")
    return torch.from_numpy(body.reshape(dims).copy())


# --- scikit-learn digits ------------------------------------------------------------------------

def _digits(calibration_size: int | None) -> Dataset:
    """8x8 digits from scikit-learn (1,797 images, shipped with the package)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy((bunch.images * (255 / 16)).round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test = order[:360].sort().values
    train = (images[order[360:].sort().values], labels[order[360:].sort().values])
    return _split("digits", tuple(str(d) for d in range(10)), train, (images[test], labels[test]),
                  calibration_size or 300, mean=(0.3, ), std=(0.38, ))


# --- users' folders -----------------------------------------------------------------------------

def _cifar10(root: Path):
    from torchvision.datasets import CIFAR10

    try:
        parts = [CIFAR10(str(root), train=t, download=False) for t in (True, False)]
    except RuntimeError:
        raise UserError(f"no CIFAR-10 found in {root}: give the folder that holds "
                        "cifar-10-batches-py (torchvision's layout)") from None
    return tuple((torch.from_numpy(p.data).permute(0, 3, 1, 2).contiguous(),
                  torch.tensor(p.targets)) for p in parts)


class ImageFiles:
    """An image folder's images, read from disk only when a batch of them is used: it stands in
    for a split's (N, 3, size, size) uint8 tensor, so that a folder of any size streams batch by
    batch. Indexing gives another `ImageFiles` (no image read); `.to(device)` and iteration
    read the images."""

    def __init__(self, found, index: torch.Tensor, size: int):
        self.found, self.index, self.size = found, index, size  # torchvision ImageFolder

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), 3, self.size, self.size)

    def __getitem__(self, index: torch.Tensor | slice) -> ImageFiles:
        return ImageFiles(self.found, self.index[index], self.size)

    def to(self, device: torch.device | str) -> torch.Tensor:
        """(n, 3, size, size) uint8: the images read and transformed."""
        return torch.stack(list(self)).to(device) if len(self) else torch.zeros(
            self.shape, dtype=torch.uint8, device=device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in self.index.tolist():
            yield _read_image(self.found, i)[0].expand(3, -1, -1)


def _read_image(found, index: int) -> tuple[torch.Tensor, int]:
    """One (image, label) of a torchvision ImageFolder, or a UserError naming the bad file."""
    try:
        return found[index]
    except (OSError, ValueError, SyntaxError) as error:  # PIL: unreadable, truncated, not an image
        raise UserError(f"cannot read image {found.samples[index][0]} ({type(error).__name__}): "
                        "remove or replace the file") from None


def _check_headers(found) -> None:
    """Every file opens as an image (its header only: a folder of any size is checked in
    seconds per 100,000 files; a file damaged further in fails when its batch is read)."""
    from PIL import Image

    for path, _ in found.samples:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError, SyntaxError) as error:
            raise UserError(f"cannot read image {path} ({type(error).__name__}): remove or "
                            "replace the file") from None


def _imagefolder(root: Path, calibration_size: int | None, image_size: int = 224) -> Dataset:
    """`root/{train,test}/<class>/*.jpg` (or a single `root/<class>/` split 80/20), streamed:
    the images are read when a batch of them is used (`ImageFiles`)."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    transform = v2.Compose([v2.PILToTensor(), v2.Resize(image_size), v2.CenterCrop(image_size)])

    def read(folder: Path):
        try:
            found = ImageFolder(str(folder), transform=transform)
        except (FileNotFoundError, OSError) as error:
            raise UserError(f"cannot read image folder {folder} ({error}): expected "
                            "<folder>/<class name>/<images>") from None
        _check_headers(found)
        return (ImageFiles(found, torch.arange(len(found)), image_size),
                torch.tensor(found.targets), tuple(found.classes))

    if (root / "train").is_dir() and (root / "test").is_dir():
        *train, classes = read(root / "train")
        *test, test_classes = read(root / "test")
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise UserError(f"{root / 'test'} has classes that {root / 'train'} lacks "
                            f"({', '.join(unknown)}); give both the same class folders")
        # each folder numbers its own classes: the test labels by the train folder's names
        test[1] = torch.tensor([classes.index(name) for name in test_classes])[test[1]]
    else:
        images, labels, classes = read(root)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
        cut = len(labels) // 5
        test = (images[order[:cut]], labels[order[:cut]])
        train = (images[order[cut:]], labels[order[cut:]])
    size = calibration_size or max(1, len(train[1]) // 5)
    return _split(f"imagefolder:{root}", classes, tuple(train), tuple(test), size,
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

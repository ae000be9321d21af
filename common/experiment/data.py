"""Datasets and deterministic batching.

Datasets live in memory as one tensor of images and one of labels (``TensorDataset``), on the
CPU or on the device that trains (``TensorDataset.to``, ``subset``: a client's own samples);
normalization and augmentation are applied per batch, as tensor operations where the dataset
is. Batches are a pure function of (seed, client_id, round_num), wherever the dataset is: a
stateless federated client, rebuilt for every message, must be able to recompute exactly the
batch it used earlier in the same round (FedTAN's synchronized first step, then the local
steps). The random draws are made on the CPU, so that they are the same on every device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The FedTAN reference normalizes CIFAR-10 with the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_CROP_PADDING = 4
DATASET_NAMES = ("cifar10", "digits", "synthetic")

# Pixel model of make_synthetic: clamp(0.5 + 0.15 * prototype + 0.15 * noise, 0, 1) with both
# terms standard normal; these are its nominal per-channel statistics.
_SYN_CENTER, _SYN_SCALE = 0.5, 0.15
_SYN_STD = float(np.sqrt(2.0) * _SYN_SCALE)


class DatasetUnavailableError(RuntimeError):
    """The dataset is not on disk and could not be downloaded."""


@dataclasses.dataclass
class TensorDataset:
    """An in-memory image dataset.

    ``images`` is (N, C, H, W), uint8 (scaled by 1/255 before normalizing) or float (used as is);
    ``mean``/``std`` hold one value per channel. ``augment`` turns on the reference's training
    augmentation (random crop with padding 4, random horizontal flip) in ``round_batches``.
    """

    images: Tensor
    labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    augment: bool = False

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"mean/std need {self.in_channels} values (one per channel)")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def normalize(self, images: Tensor) -> Tensor:
        """float32, per-channel normalized copy of raw ``images`` from this dataset (on their
        device)."""
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        mean, std = (
            torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(images.device)
            for v in (self.mean, self.std)
        )
        return (x - mean) / std

    def subset(self, indices: np.ndarray | Sequence[int]) -> TensorDataset:
        """The samples at ``indices``, in that order (a copy): a client's own dataset."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64)).to(self.images.device)
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])

    def to(self, device: torch.device | str) -> TensorDataset:
        """This dataset with its images and labels on ``device``."""
        return dataclasses.replace(
            self, images=self.images.to(device), labels=self.labels.to(device)
        )


# ---------------------------------------------------------------------------------------------
# Loaders


def load_cifar10(root: str | Path, train: bool, download: bool = True) -> TensorDataset:
    """CIFAR-10 through torchvision, as uint8 NCHW; train split augmented like the reference."""
    import torchvision  # lazy: clients on digits/synthetic data need not pay for the import

    root = Path(root)
    try:
        ds = torchvision.datasets.CIFAR10(root=str(root), train=train, download=download)
    except (RuntimeError, OSError) as exc:  # OSError covers URLError and socket errors
        raise DatasetUnavailableError(
            f"CIFAR-10 is not in {root.resolve()} and could not be downloaded "
            f"({type(exc).__name__}: {exc}). On a machine with internet access run\n"
            f"    python -c \"import torchvision; torchvision.datasets.CIFAR10('{root}', "
            f'download=True)"\n'
            f"and copy {root}/cifar-10-batches-py to this machine (or pass another data_dir)."
        ) from exc
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
    return TensorDataset(
        images=images,
        labels=labels,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes=10,
        augment=train,
    )


def load_digits(train: bool, seed: int = 0, test_fraction: float = 0.2) -> TensorDataset:
    """scikit-learn's bundled 8x8 digits (1797 real images, no download), stratified split.

    Both splits are normalized with the mean/std of the train split.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = sk_load_digits()
    x = bunch.images.astype(np.float32) / 16.0  # pixel values are 0..16
    y = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed
    )
    mean, std = float(x[idx_train].mean()), float(x[idx_train].std())
    idx = idx_train if train else idx_test
    return TensorDataset(
        images=torch.from_numpy(x[idx]).unsqueeze(1),
        labels=torch.from_numpy(y[idx]),
        mean=(mean,),
        std=(std,),
        num_classes=10,
        augment=False,
    )


def make_synthetic(
    num_samples: int,
    *,
    shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
    split: str = "train",
    augment: bool = False,
) -> TensorDataset:
    """Generated images: a smooth per-class prototype plus pixel noise, stored as uint8.

    The prototypes depend only on ``seed``, the samples on (seed, split), so "train" and "test"
    draw different samples of the same classes. Labels are balanced (class = i mod num_classes,
    then shuffled). Low-frequency prototypes survive random crops, so augmentation can be on.
    """
    if num_samples < 1 or num_classes < 1:
        raise ValueError("num_samples and num_classes must be >= 1")
    c, h, w = shape
    proto_gen = torch.Generator().manual_seed(_mix_seed(seed, 0))
    coarse = torch.randn(num_classes, c, max(1, h // 4), max(1, w // 4), generator=proto_gen)
    protos = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    protos = protos / protos.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)

    split_id = {"train": 1, "test": 2}.get(split)
    if split_id is None:
        raise ValueError(f"unknown split {split!r}; valid: train, test")
    gen = torch.Generator().manual_seed(_mix_seed(seed, split_id))
    labels = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=gen)]
    noise = torch.randn(num_samples, c, h, w, generator=gen)
    pixels = _SYN_CENTER + _SYN_SCALE * (protos[labels] + noise)
    images = (pixels.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return TensorDataset(
        images=images,
        labels=labels,
        mean=(_SYN_CENTER,) * c,
        std=(_SYN_STD,) * c,
        num_classes=num_classes,
        augment=augment,
    )


def load_dataset(
    name: str,
    train: bool,
    *,
    data_dir: str | Path = "data",
    seed: int = 0,
    download: bool = True,
    synthetic_size: int | None = None,
) -> TensorDataset:
    """Dispatch on ``name``: "cifar10" | "digits" | "synthetic" (CIFAR-shaped, 10 classes)."""
    if name == "cifar10":
        return load_cifar10(data_dir, train=train, download=download)
    if name == "digits":
        return load_digits(train=train, seed=seed)
    if name == "synthetic":
        size = synthetic_size if synthetic_size is not None else (5000 if train else 1000)
        return make_synthetic(size, seed=seed, split="train" if train else "test")
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASET_NAMES)}")


# ---------------------------------------------------------------------------------------------
# Batches


def _mix_seed(*values: int) -> int:
    """One 63-bit seed from several non-negative ints (well mixed, unlike simple arithmetic)."""
    if any(v < 0 for v in values):
        raise ValueError(f"seed components must be >= 0, got {values}")
    state = np.random.SeedSequence(list(values)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _augment(images: Tensor, gen: torch.Generator, padding: int = CIFAR_CROP_PADDING) -> Tensor:
    """Random crop (zero padding ``padding``) and horizontal flip, for a whole batch at once.

    Applied to raw pixels before normalization, like torchvision's RandomCrop/RandomHorizontalFlip
    before ToTensor/Normalize in the reference, so padded pixels are raw zeros.
    """
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    # Drawn on the CPU (``gen`` is a CPU generator): the same draws for every device.
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=gen).to(device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(device)
    rows = offsets[:, :1] + torch.arange(h, device=device)  # (n, h)
    cols_fwd = torch.arange(w, device=device)
    cols = offsets[:, 1:] + torch.where(flip[:, None], cols_fwd.flip(0), cols_fwd)  # (n, w)
    return padded[
        torch.arange(n, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def round_batches(
    dataset: TensorDataset,
    indices: np.ndarray | Sequence[int],
    *,
    round_num: int,
    num_steps: int,
    batch_size: int,
    seed: int,
    client_id: int,
) -> list[tuple[Tensor, Tensor]]:
    """The ``num_steps`` training batches of one client in one round; a pure function.

    One torch.Generator seeded from (seed, client_id, round_num) draws, in this order, the
    permutation of the client's ``indices`` and then the augmentation of all the round's samples
    (crop offsets, then flips). Batches are consecutive slices of that permutation, wrapping
    around to its start when the partition holds fewer than num_steps * batch_size samples; a
    partition smaller than ``batch_size`` gives batches of the partition's size (no sample twice
    in a batch). Returns float32 normalized images and int64 labels, on the dataset's device;
    the same values wherever it is, and the same for ``dataset.subset(indices)`` with
    ``indices`` ``0 .. len - 1``.
    """
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    if idx.ndim != 1 or len(idx) == 0:
        raise ValueError("indices must be a non-empty 1-D array")
    if num_steps < 1 or batch_size < 1:
        raise ValueError(f"num_steps and batch_size must be >= 1, got {num_steps}, {batch_size}")
    gen = torch.Generator().manual_seed(_mix_seed(seed, client_id, round_num))
    order = idx[torch.randperm(len(idx), generator=gen)]
    bs = min(batch_size, len(idx))
    chosen = order[torch.arange(num_steps * bs) % len(idx)].to(dataset.images.device)
    images = dataset.images[chosen]
    if dataset.augment:
        images = _augment(images, gen)
    x = dataset.normalize(images)
    y = dataset.labels[chosen]
    return [(x[i * bs : (i + 1) * bs], y[i * bs : (i + 1) * bs]) for i in range(num_steps)]


def eval_batches(dataset: TensorDataset, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalized, un-augmented batches of the whole dataset, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(dataset), batch_size):
        stop = start + batch_size
        yield dataset.normalize(dataset.images[start:stop]), dataset.labels[start:stop]

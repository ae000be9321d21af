"""Specification of common/experiment/data.py."""

from __future__ import annotations

import dataclasses
import tomllib
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from common.experiment import task
from common.experiment.config import RunConfig
from common.experiment.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetUnavailableError,
    TensorDataset,
    eval_batches,
    load_cifar10,
    load_dataset,
    load_digits,
    make_synthetic,
    round_batches,
)
from tests.devices import device_params


@pytest.fixture(scope="module")
def digits_train() -> TensorDataset:
    return load_digits(train=True)


@pytest.fixture(scope="module")
def cifar_like() -> TensorDataset:
    """A small augmented uint8 dataset shaped like the CIFAR-10 training set."""
    return make_synthetic(300, seed=1, augment=True)


def tagged(dataset: TensorDataset) -> TensorDataset:
    """The same images, labelled with their own index: a batch's labels say where it came from."""
    n = len(dataset)
    return dataclasses.replace(dataset, labels=torch.arange(n), num_classes=n)


def tag(
    dataset: TensorDataset, indices: np.ndarray, **overrides: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return round_batches(tagged(dataset), indices, **batch_kwargs(**overrides))


def batch_kwargs(**overrides: int) -> dict[str, int]:
    kwargs = {"round_num": 3, "num_steps": 4, "batch_size": 32, "seed": 0, "client_id": 2}
    kwargs.update(overrides)
    return kwargs


# --- digits ----------------------------------------------------------------------------------


def test_digits_shapes_classes_and_split(digits_train: TensorDataset) -> None:
    test = load_digits(train=False)
    assert len(digits_train) + len(test) == 1797
    assert len(test) == pytest.approx(0.2 * 1797, abs=1)
    assert digits_train.images.shape[1:] == (1, 8, 8)
    assert digits_train.in_channels == 1 and digits_train.num_classes == 10
    assert digits_train.labels.dtype == torch.long
    assert not digits_train.augment and not test.augment
    # Stratified: every class keeps its share in both splits.
    train_share = np.bincount(digits_train.labels.numpy()) / len(digits_train)
    test_share = np.bincount(test.labels.numpy()) / len(test)
    assert np.abs(train_share - test_share).max() < 0.01


def test_digits_are_normalized_with_train_statistics(digits_train: TensorDataset) -> None:
    x = torch.cat([xb for xb, _ in eval_batches(digits_train, 500)])
    assert x.dtype == torch.float32
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    test = load_digits(train=False)
    assert test.mean == digits_train.mean and test.std == digits_train.std


def test_digits_split_is_reproducible_and_depends_on_seed(digits_train: TensorDataset) -> None:
    again = load_digits(train=True, seed=0)
    assert torch.equal(again.images, digits_train.images)
    assert torch.equal(again.labels, digits_train.labels)
    other = load_digits(train=True, seed=1)
    assert not torch.equal(other.labels, digits_train.labels)


# --- round_batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("dataset_name", ["digits_train", "cifar_like"])
def test_round_batches_is_a_pure_function_of_its_arguments(
    dataset_name: str, request: pytest.FixtureRequest
) -> None:
    dataset = request.getfixturevalue(dataset_name)
    indices = np.arange(0, 200, 2)
    first = round_batches(dataset, indices, **batch_kwargs())
    again = round_batches(dataset, indices.copy(), **batch_kwargs())
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("change", ["round_num", "seed", "client_id"])
def test_round_batches_change_with_round_seed_and_client(
    cifar_like: TensorDataset, change: str
) -> None:
    indices = np.arange(200)
    base = round_batches(cifar_like, indices, **batch_kwargs())
    other = round_batches(cifar_like, indices, **batch_kwargs(**{change: 4}))
    assert not torch.equal(base[0][0], other[0][0])


def test_round_batches_sizes_dtypes_and_membership(digits_train: TensorDataset) -> None:
    indices = np.arange(100, 300)
    batches = round_batches(digits_train, indices, **batch_kwargs(num_steps=5, batch_size=40))
    assert len(batches) == 5
    for x, y in batches:
        assert x.shape == (40, 1, 8, 8) and x.dtype == torch.float32
        assert y.shape == (40,) and y.dtype == torch.long
    # One pass over 200 samples in 5 x 40: every sample of the partition exactly once, shuffled.
    drawn = torch.cat([y for _, y in tag(digits_train, indices, num_steps=5, batch_size=40)])
    assert sorted(drawn.tolist()) == indices.tolist()
    assert drawn.tolist() != indices.tolist()
    assert torch.equal(torch.cat([y for _, y in batches]), digits_train.labels[drawn])


def test_round_batches_wrap_around_a_short_partition(digits_train: TensorDataset) -> None:
    indices = np.arange(50)
    batches = tag(digits_train, indices, num_steps=3, batch_size=32)
    assert [len(y) for _, y in batches] == [32, 32, 32]
    # 96 draws from 50 samples: one pass over a permutation, then the same permutation again.
    drawn = torch.cat([y for _, y in batches])
    assert sorted(drawn[:50].tolist()) == indices.tolist()
    assert torch.equal(drawn[50:], drawn[:46])
    x_all = torch.cat([x for x, _ in batches])
    assert torch.equal(x_all[50:], x_all[:46])


def test_round_batches_partition_smaller_than_batch(digits_train: TensorDataset) -> None:
    indices = np.array([5, 17, 23, 42, 99])
    batches = tag(digits_train, indices, num_steps=2, batch_size=128)
    assert [len(y) for _, y in batches] == [5, 5]
    for _, drawn in batches:  # each batch is the whole partition, in some order
        assert sorted(drawn.tolist()) == indices.tolist()


def test_round_batches_refuse_empty_partition(digits_train: TensorDataset) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        round_batches(digits_train, np.array([], dtype=np.int64), **batch_kwargs())


def test_augmentation_is_random_crop_with_padding_and_flip(cifar_like: TensorDataset) -> None:
    n = len(cifar_like)
    ((x, src),) = tag(cifar_like, np.arange(n), num_steps=1, batch_size=n)
    padded = cifar_like.normalize(F.pad(cifar_like.images[src], (4, 4, 4, 4)))  # raw zero pad
    windows = padded.unfold(2, 32, 1).unfold(3, 32, 1)  # (n, C, 9, 9, 32, 32): all crops
    plain = (windows == x[:, :, None, None]).flatten(-2).all(-1).all(1)  # (n, 9, 9)
    mirrored = (windows.flip(-1) == x[:, :, None, None]).flatten(-2).all(-1).all(1)
    assert (plain | mirrored).flatten(1).any(1).all(), (
        "some sample is not a crop/flip of its source"
    )
    flipped = mirrored.flatten(1).any(1) & ~plain.flatten(1).any(1)
    assert 0.35 < flipped.float().mean().item() < 0.65
    centered = (plain | mirrored)[:, 4, 4]
    assert centered.float().mean().item() < 0.2  # 80 of 81 offsets move the image


def test_no_augmentation_gives_the_normalized_source_images(digits_train: TensorDataset) -> None:
    ((x, src),) = tag(digits_train, np.arange(64), num_steps=1, batch_size=64)
    assert torch.equal(x, digits_train.normalize(digits_train.images[src]))


# --- batches drawn where the client trains --------------------------------------------------


@device_params
def test_a_client_dataset_on_any_device_gives_the_same_batches(cifar_like, device):
    """A client's own samples (``subset``) on the device that trains: drawn and augmented
    there, the batches of the whole dataset on the CPU, bit for bit (crop, flip, normalization,
    a partition in no particular order that the round wraps around)."""
    indices = np.random.default_rng(0).permutation(len(cifar_like))[:50]
    draw = batch_kwargs(num_steps=4, batch_size=16)  # 64 samples from 50: wraps around
    expected = round_batches(cifar_like, indices, **draw)
    own = cifar_like.subset(indices).to(device)
    assert own.images.device.type == device and len(own) == 50
    got = round_batches(own, np.arange(len(own)), **draw)
    for (x, y), (x_cpu, y_cpu) in zip(got, expected, strict=True):
        assert x.device.type == device and y.device.type == device
        assert torch.equal(x.cpu(), x_cpu) and torch.equal(y.cpu(), y_cpu)


def test_client_batches_on_a_device_are_todays_and_its_samples_are_kept_there(monkeypatch):
    defaults = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    cfg = RunConfig.from_flower({**defaults["tool"]["flwr"]["app"]["config"], "dataset": "digits"})
    cpu = torch.device("cpu")
    task.client_dataset.cache_clear()

    def batches(server_round: int, device: torch.device | None):
        return task.client_batches(
            cfg, 1, 3, server_round, batch_size=8, local_steps=3, device=device
        )

    first = batches(1, cpu)

    def refuse(*_args):
        raise AssertionError("the client's samples were gathered again")

    monkeypatch.setattr(TensorDataset, "subset", refuse)
    for server_round, got in ((1, first), (2, batches(2, cpu))):
        for (x, y), (x_today, y_today) in zip(got, batches(server_round, None), strict=True):
            assert torch.equal(x, x_today) and torch.equal(y, y_today)


# --- CIFAR-10 (no network: torchvision's dataset class is replaced) ---------------------------


class FakeCifar10:
    """Stands in for torchvision.datasets.CIFAR10 with 6 tiny random images."""

    def __init__(self, root: str, train: bool, download: bool) -> None:
        rng = np.random.default_rng(int(train))
        self.data = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)  # NHWC, as torchvision
        self.targets = [0, 1, 2, 3, 4, 5]


class OfflineCifar10:
    """Behaves like torchvision.datasets.CIFAR10 without the files and without internet."""

    def __init__(self, root: str, train: bool, download: bool) -> None:
        if download:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        raise RuntimeError("Dataset not found or corrupted. You can use download=True")


def test_cifar10_is_uint8_nchw_with_reference_preprocessing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCifar10)
    train = load_cifar10(tmp_path, train=True)
    assert train.images.dtype == torch.uint8 and train.images.shape == (6, 3, 32, 32)
    raw = FakeCifar10(str(tmp_path), True, False).data
    assert np.array_equal(train.images.permute(0, 2, 3, 1).numpy(), raw)
    assert train.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert train.mean == IMAGENET_MEAN and train.std == IMAGENET_STD
    assert train.num_classes == 10 and train.in_channels == 3
    assert train.augment  # random crop + flip, like the reference
    assert not load_cifar10(tmp_path, train=False).augment
    assert load_dataset("cifar10", True, data_dir=tmp_path).augment


@pytest.mark.parametrize("download", [True, False])
def test_missing_cifar10_gives_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, download: bool
) -> None:
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", OfflineCifar10)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetUnavailableError) as info:
        load_cifar10("data/cifar", train=True, download=download)
    message = str(info.value)
    assert str(tmp_path / "data" / "cifar") in message  # names the folder, as an absolute path
    assert "torchvision.datasets.CIFAR10" in message and "download=True" in message  # the fix
    assert not isinstance(info.value, urllib.error.URLError)


# --- synthetic data and dispatch --------------------------------------------------------------


def test_synthetic_is_deterministic_balanced_and_shaped() -> None:
    a = make_synthetic(200, seed=5)
    b = make_synthetic(200, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = make_synthetic(200, seed=6)
    assert not torch.equal(other.images, a.images) and not torch.equal(other.labels, a.labels)
    assert a.images.shape == (200, 3, 32, 32) and a.images.dtype == torch.uint8
    assert np.bincount(a.labels.numpy()).tolist() == [20] * 10
    small = make_synthetic(30, shape=(1, 8, 8), num_classes=3)
    assert small.images.shape == (30, 1, 8, 8) and small.num_classes == 3
    assert not a.augment  # generated data is only augmented on request


def test_synthetic_classes_are_learnable_and_splits_differ() -> None:
    train = make_synthetic(500, seed=2, split="train")
    test = make_synthetic(200, seed=2, split="test")
    assert not torch.equal(train.images[:200], test.images)
    # Nearest class mean, fitted on train, classifies the test split: the classes carry signal.
    xtr, xte = train.normalize(train.images).flatten(1), test.normalize(test.images).flatten(1)
    means = torch.stack([xtr[train.labels == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(xte, means).argmin(1) == test.labels).float().mean().item()
    assert accuracy > 0.9
    # The nominal normalization constants are close to the data's own statistics.
    assert xtr.mean().item() == pytest.approx(0.0, abs=0.1)
    assert xtr.std().item() == pytest.approx(1.0, abs=0.1)


def test_load_dataset_dispatches_and_refuses_unknown_names() -> None:
    digits = load_dataset("digits", True, data_dir="unused", seed=0)
    assert digits.in_channels == 1 and len(digits) == len(load_digits(train=True))
    synthetic = load_dataset("synthetic", False, data_dir="unused", seed=0, synthetic_size=40)
    assert len(synthetic) == 40 and synthetic.images.shape[1:] == (3, 32, 32)
    with pytest.raises(ValueError, match="cifar10, digits, synthetic"):
        load_dataset("mnist", True, data_dir="unused", seed=0)


def test_eval_batches_cover_the_dataset_in_order(digits_train: TensorDataset) -> None:
    batches = list(eval_batches(digits_train, 500))
    assert [len(y) for _, y in batches] == [500, 500, len(digits_train) - 1000]
    assert torch.equal(torch.cat([y for _, y in batches]), digits_train.labels)
    assert torch.equal(batches[0][0], digits_train.normalize(digits_train.images[:500]))

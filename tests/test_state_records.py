"""Model states as Flower ArrayRecords (common/state_records.py): exactly Flower's own
conversions, both ways, for every kind of entry a model state has and for records that were
not written the usual way."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.experiment import task
from common.experiment.config import RunConfig
from common.state_records import record_to_state, state_to_record


def model_state(model: str) -> dict[str, torch.Tensor]:
    dataset = "digits" if model == "small_cnn" else "synthetic"
    cfg = RunConfig.from_flower({"dataset": dataset, "model": model, "num-clients": 2})
    return task.build_global_model(cfg).state_dict()


ODD_ENTRIES = {
    "float16": torch.randn(3, 5).half(),
    "float64": torch.randn(7, dtype=torch.float64),
    "int64 scalar": torch.tensor(12),
    "int32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
    "uint8": torch.arange(200, dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "complex64": torch.randn(4, dtype=torch.complex64),
    "empty": torch.zeros(0, 3),
    "float scalar": torch.tensor(2.5),
    "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    "transposed": torch.randn(4, 6).t(),
    "sliced": torch.randn(10)[::3],
    "needs grad": torch.randn(3, requires_grad=True),
}


def assert_same_record(ours: ArrayRecord, flowers: ArrayRecord) -> None:
    assert list(ours) == list(flowers)
    for key in flowers:
        mine, theirs = ours[key], flowers[key]
        assert (mine.dtype, tuple(mine.shape), mine.stype) == (
            theirs.dtype,
            tuple(theirs.shape),
            theirs.stype,
        ), key
        assert mine.data == theirs.data, key


def assert_same_state(ours: dict[str, torch.Tensor], flowers: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(flowers)
    for key in flowers:
        assert ours[key].dtype == flowers[key].dtype, key
        assert ours[key].shape == flowers[key].shape, key
        assert torch.equal(ours[key], flowers[key]), key


@pytest.mark.parametrize("source", ["small_cnn", "resnet20", "odd entries"])
def test_a_state_becomes_the_record_flower_writes_and_back(source):
    state = ODD_ENTRIES if source == "odd entries" else model_state(source)
    record = state_to_record(state)
    assert_same_record(record, ArrayRecord(state))
    assert_same_state(record_to_state(record), dict(record.to_torch_state_dict()))
    for key, tensor in record_to_state(record).items():
        assert torch.equal(tensor, state[key].detach()), key


def test_the_tensors_read_are_new_and_writable():
    record = ArrayRecord({"w": torch.ones(4)})
    state = record_to_state(record)
    state["w"].add_(1.0)  # no warning, no error: a tensor of its own
    assert torch.equal(record_to_state(record)["w"], torch.ones(4))
    assert torch.equal(torch.from_numpy(record["w"].numpy()), torch.ones(4))


def saved(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_records_written_another_way_are_read_as_flower_reads_them():
    """Fortran-ordered data, a declared shape that differs from the data's own header, bytes
    after the data: read by Flower's code, with Flower's result."""
    fortran = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    record = ArrayRecord()
    record["fortran"] = Array(
        dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=saved(fortran)
    )
    record["declared (2, 6)"] = Array(
        dtype="float32", shape=(2, 6), stype="numpy.ndarray", data=saved(fortran.copy(order="C"))
    )
    record["trailing bytes"] = Array(
        dtype="float32",
        shape=(2,),
        stype="numpy.ndarray",
        data=saved(np.ones(2, np.float32)) + b"x",
    )
    assert_same_state(record_to_state(record), dict(record.to_torch_state_dict()))
    assert record_to_state(record)["declared (2, 6)"].shape == (3, 4)  # the data's header wins


@pytest.mark.parametrize(
    ("dtype", "shape", "data"),
    [
        ("float32", (4,), saved(np.zeros(4, np.float32))[:-3]),  # truncated
        ("object", (2,), b"\x93NUMPY not really"),  # objects are never unpickled
        ("float32", (-1,), b""),  # an impossible shape
        ("no such dtype", (1,), saved(np.zeros(1, np.float32))[:-1]),
    ],
)
def test_malformed_entries_fail_as_they_do_in_flower(dtype, shape, data):
    record = ArrayRecord()
    record["bad"] = Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)
    with pytest.raises(Exception) as flowers:
        record.to_torch_state_dict()
    with pytest.raises(type(flowers.value)):
        record_to_state(record)


def test_usual_entries_skip_numpys_save_and_load(monkeypatch):
    """The point of the module: a model state's entries never go through np.save / np.load."""
    state = model_state("small_cnn")
    record = ArrayRecord(state)

    def refuse(*args, **kwargs):
        raise AssertionError("went through Flower's per-array conversion")

    monkeypatch.setattr(Array, "numpy", refuse)
    monkeypatch.setattr(Array, "from_numpy_ndarray", refuse)
    assert_same_record(state_to_record(state), record)
    for key, tensor in record_to_state(record).items():
        assert torch.equal(tensor, state[key]), key

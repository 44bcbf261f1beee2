"""SafeFileSystemReader: real DCP checkpoints load exactly; crafted ones are refused before any code runs.

Each hostile file is also fed to DCP's stock reader, which does run its payload (a `touch`), so these tests
can fail: if a refusal stopped happening, the marker file would appear."""

import os
import pickle
import shlex

import pytest
import ranks
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from train import safe_dcp
from train.safe_dcp import DamagedFileError, UnsafeFileError, read_metadata

pytestmark = pytest.mark.compat  # every test: DCP's reader and planner change between versions


class Touch:
    """Unpickling this runs `touch marker` (pickled as posix.system), the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))


def trained(seed: int = 0, lr: float = 1e-3, betas=(0.9, 0.999)):
    """Two linear layers and an AdamW that has taken one step, so that it has state to save."""
    model = tiny(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=0.05)
    model(torch.randn(3, 4)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def save(folder, model, optimizer) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)


def load(folder, model, optimizer, reader=None) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    if reader is None:
        safe_dcp.load(state, folder)
    else:
        dcp.load(state, storage_reader=reader)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def assert_same_state(actual, expected) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_same_state(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same_state(a, e)
    else:
        assert actual == expected


def refusals(error: CheckpointException) -> list[BaseException]:
    """DCP wraps whatever a rank raised into one CheckpointException."""
    return [failure for failure, _traceback in error.failures.values()]


def test_checkpoint_round_trips_exactly(tmp_path):
    model, optimizer = trained()
    save(tmp_path / "ckpt", model, optimizer)
    fresh_model, fresh_optimizer = trained(seed=1, lr=0.5, betas=(0.1, 0.2))  # differs in every value
    load(tmp_path / "ckpt", fresh_model, fresh_optimizer)
    assert_same_state(fresh_model.state_dict(), model.state_dict())
    assert_same_state(fresh_optimizer.state_dict(), optimizer.state_dict())
    assert fresh_optimizer.param_groups[0]["lr"] == 1e-3 and fresh_optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_hostile_metadata_is_refused_before_it_runs(tmp_path):
    folder, marker = tmp_path / "ckpt", tmp_path / "ran"
    model, optimizer = trained()
    save(folder, model, optimizer)
    hostile = read_metadata(folder)
    hostile.planner_data = Touch(marker)  # otherwise the real metadata: only the payload is foreign
    (folder / ".metadata").write_bytes(pickle.dumps(hostile))

    with pytest.raises(UnsafeFileError) as refused:
        read_metadata(folder)
    message = str(refused.value)
    assert "\n" not in message and str(folder / ".metadata") in message and "posix.system" in message
    with pytest.raises(UnsafeFileError, match="posix.system"):  # on every torch version, before dcp.load runs
        load(folder, *trained())
    assert not marker.exists()

    dcp.FileSystemReader(str(folder)).read_metadata()  # the stock reader runs it: the test can fail
    assert marker.exists()


def test_hostile_byte_item_is_refused_before_it_runs(tmp_path):
    folder, marker = tmp_path / "ckpt", tmp_path / "ran"
    model, optimizer = trained()
    save(folder, model, optimizer)
    # point the optimizer's lr (a byte item) at a torch.save'd payload appended to its .distcp file
    metadata = read_metadata(folder)
    assert isinstance(metadata.state_dict_metadata["optim.param_groups.0.lr"], BytesStorageMetadata)
    index = next(i for i in metadata.storage_data if i.fqn == "optim.param_groups.0.lr")
    info = metadata.storage_data[index]
    data_file = folder / info.relative_path
    with open(data_file, "ab") as out:
        info.offset = out.tell()
        torch.save({"lr": Touch(marker)}, out)
        info.length = out.tell() - info.offset
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))

    with pytest.raises(CheckpointException) as caught:
        load(folder, *trained())
    [refused] = refusals(caught.value)
    assert isinstance(refused, UnsafeFileError)
    message = str(refused)
    assert "\n" not in message and str(data_file) in message and "posix.system" in message
    assert not marker.exists()

    try:  # the stock reader runs it (whether the load then fails is beside the point)
        load(folder, *trained(), reader=dcp.FileSystemReader(str(folder)))
    except BaseException:
        pass
    assert marker.exists()


def save_sharded(rank: int, folder: str) -> None:
    """One of 2 gloo ranks (tests/ranks.py starts them, and waits for both before the group is torn down)."""
    from torch.distributed.fsdp import fully_shard

    model = tiny()  # same seed on both ranks: the same start, then FSDP2 shards it
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    torch.manual_seed(0)
    model(torch.randn(3, 4)).square().sum().backward()
    optimizer.step()
    save(folder, model, optimizer)
    full = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, os.path.join(folder, "full.pt"))


@pytest.mark.distributed
def test_fsdp2_checkpoint_from_two_ranks_loads_in_one_process(tmp_path):
    folder = tmp_path / "ckpt"
    ranks.spawn(save_sharded, str(folder), world_size=2)
    full_model, full_optim = torch.load(folder / "full.pt", weights_only=True)
    assert {path.name for path in folder.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}

    model, optimizer = trained(seed=1, lr=0.5)
    load(folder, model, optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)
    assert_same_state(model_state, full_model)
    assert_same_state(optim_state, full_optim)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_metadata_is_one_line_naming_the_file(tmp_path, damage):
    folder = tmp_path / "ckpt"
    save(folder, *trained())
    path = folder / ".metadata"
    good = path.read_bytes()
    path.write_bytes(
        {"garbage": b"\x80\x04not a pickle at all\n\x00", "truncated": good[: len(good) // 2], "empty": b""}[damage]
    )
    with pytest.raises(DamagedFileError) as damaged:
        read_metadata(folder)
    assert "\n" not in str(damaged.value) and str(path) in str(damaged.value)

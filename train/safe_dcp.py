"""Reading DCP checkpoints without running code from them.

torch.distributed.checkpoint (torch 2.13) unpickles a checkpoint's `.metadata` with plain `pickle.load`, and
its default load planner unpickles every non-tensor item (optimizer hyperparameters) with
`torch.load(weights_only=False)`: a crafted checkpoint would run arbitrary code on resume, export or
evaluate. `SafeFileSystemReader` is DCP's own reader with both doors closed:

  .metadata    unpickled with an exact allow-list: the classes DCP's metadata is made of, found by recording
               every global that torch 2.13 writes for plain and FSDP2 (DTensor, 2-rank) model + AdamW
               state. Any other global is refused before it is looked up, so nothing is imported or called.
  byte items   unpickled by torch's weights-only loader (numbers, strings, None, lists, tuples, dicts), then
               handed to the planner re-serialised by us, so its unrestricted torch.load only sees our pickle.

Tensors DCP already reads weights-only. A refused file raises UnsafeFileError; a file that is not what DCP
wrote (garbage, truncated) raises DamagedFileError; both one line, naming the file.
"""

import io
import os
import pathlib
import pickle
from typing import IO

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem, metadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem

from groundwork.errors import UserError

# (module, name) -> object. Every entry appears in the .metadata torch 2.13 writes:
METADATA_GLOBALS = {
    **{
        ("torch.distributed.checkpoint.metadata", cls.__name__): cls
        for cls in (
            metadata.Metadata,  # the root object
            metadata.StorageMeta,  # Metadata.storage_meta (checkpoint_id, save_id, load_id)
            metadata.MetadataIndex,  # keys of Metadata.storage_data
            metadata.TensorStorageMetadata,  # one per tensor: properties, size, chunks
            metadata.ChunkStorageMetadata,  # one per saved shard (offsets, sizes); FSDP2 saves several
            metadata.TensorProperties,  # dtype/layout/requires_grad/memory format/pin_memory
            metadata._MEM_FORMAT_ENCODING,  # TensorProperties pickles its memory format as this enum
            metadata.BytesStorageMetadata,  # one per non-tensor item (param_groups entries)
        )
    },
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,  # file, offset, length
    ("torch", "Size"): torch.Size,  # tensor sizes, chunk offsets and sizes
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # how torch.layout pickles
    ("pathlib", "PosixPath"): pathlib.PosixPath,  # StorageMeta.checkpoint_id when saved with a Path
}


class UnsafeFileError(UserError, ValueError):
    """A checkpoint file that would run code if read with plain pickle; names the file and what it holds."""


class DamagedFileError(UserError, ValueError):
    """A checkpoint file that is not what DCP wrote (garbage, truncated); names the file."""


def refused(path: str | os.PathLike, what: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path}: holds {what}, which the weights-only loader refuses; use only checkpoints this project wrote"
    )


def damaged(path: str | os.PathLike, error: BaseException) -> DamagedFileError:
    detail = " ".join(str(error).split())[:120]  # pickle/zip messages can span lines; ours must not
    return DamagedFileError(
        f"{path}: not what DCP writes ({type(error).__name__}: {detail}); the checkpoint "
        f"is damaged or incomplete: use another one"
    )


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], path: str | os.PathLike):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_GLOBALS:
            return METADATA_GLOBALS[module, name]
        # any dtype may appear (bf16 weights, int64 counters); vars(), not getattr(), so that a name like
        # "_dynamo" cannot make torch's lazy __getattr__ import a submodule
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            return vars(torch)[name]
        raise refused(self.path, f"{module}.{name}")


def _unpickle_metadata(stream: IO[bytes], path: str | os.PathLike) -> metadata.Metadata:
    try:
        loaded = _MetadataUnpickler(stream, path).load()
    except UnsafeFileError:
        raise
    except Exception as error:  # truncated or garbage: pickle raises many types (EOFError, KeyError, ...)
        raise damaged(path, error) from None
    if not isinstance(loaded, metadata.Metadata) or not isinstance(loaded.storage_data, dict):
        raise damaged(path, TypeError(f"holds a {type(loaded).__name__}, not DCP metadata"))
    for info in loaded.storage_data.values():
        # DCP only ever writes files into the checkpoint folder itself; refuse reads from anywhere else
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name in ("", ".", "..") or pathlib.PurePath(name).name != name:
            raise damaged(path, ValueError(f"storage entry {info!r} points outside the checkpoint"))
    return loaded


class _WeightsOnlyBytes:
    """DCP's load planner, except that byte items reach it only after a weights-only load succeeded."""

    def __init__(self, planner: LoadPlanner, reader: "SafeFileSystemReader"):
        self._planner, self._reader = planner, reader

    def __getattr__(self, name: str):
        return getattr(self._planner, name)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        info = self._reader.storage_data[read_item.storage_index]
        where = f"{self._reader.fs.concat_path(self._reader.path, info.relative_path)} ({read_item.dest_index.fqn})"
        try:
            plain = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise refused(where, unsafe_globals(value)) from None
        except Exception as error:
            raise damaged(where, error) from None
        reserialised = io.BytesIO()
        torch.save(plain, reserialised)  # our pickle of plain data: what the planner unpickles is harmless
        reserialised.seek(0)
        self._planner.load_bytes(read_item, reserialised)


def unsafe_globals(value: io.BytesIO) -> str:
    """What the weights-only loader refused, read from the pickle's opcodes without running any of it."""
    value.seek(0)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(value)
    except Exception:  # not a torch.save zip (DCP always writes one): a hand-made pickle
        names = []
    return ", ".join(names) if names else "a pickle it cannot vouch for"


class SafeFileSystemReader(dcp.FileSystemReader):
    """dcp.load(state, storage_reader=SafeFileSystemReader(folder)): DCP's reader, never running pickled code."""

    def read_metadata(self, *args: object, **kwargs: object) -> metadata.Metadata:
        # as FileSystemReader.read_metadata, with the pickle.load replaced
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            loaded = _unpickle_metadata(stream, path)
        if getattr(loaded, "storage_meta", None) is None:
            loaded.storage_meta = metadata.StorageMeta()
        loaded.storage_meta.load_id = self.load_id
        return loaded

    def read_data(self, plan: LoadPlan, planner: LoadPlanner):
        return super().read_data(plan, _WeightsOnlyBytes(planner, self))


def read_metadata(folder: str | os.PathLike) -> metadata.Metadata:
    """The checkpoint's metadata (what is saved, shapes, dtypes), read safely; no process group needed."""
    return SafeFileSystemReader(str(folder)).read_metadata()


def load(state: dict, folder: str | os.PathLike) -> None:
    """dcp.load(state) from `folder`, never running pickled code. The metadata is read first, alone, so that a
    refusal raises UnsafeFileError or DamagedFileError itself: inside dcp.load a reader's error is caught
    (torch 2.13 wraps it in a CheckpointException after logging a traceback; torch 2.11 drops it and fails on
    "metadata is None")."""
    read_metadata(folder)
    dcp.load(state, storage_reader=SafeFileSystemReader(str(folder)))

"""Reading DCP checkpoints without running code from them.

torch.distributed.checkpoint writes its `.metadata` as a pickle and reads it back with plain `pickle.load`,
and it unpickles non-tensor items (optimizer hyperparameters) with `torch.load(weights_only=False)`: a
crafted checkpoint would run arbitrary code on resume, export, evaluate or generate. `SafeFileSystemReader`
is DCP's own reader with both doors closed:
  .metadata    unpickled with only the classes DCP's metadata is made of (found by recording what torch
               2.13 writes for plain, FSDP2 and DTensor state): the metadata dataclasses, torch.Size,
               torch dtypes and layouts, pathlib paths. Any other global is refused.
  byte items   unpickled by torch's weights-only loader (plain numbers, strings, lists, tuples, dicts).
Tensors were already read weights-only by DCP itself.
"""

import collections
import io
import pathlib
import pickle
import re

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem, metadata
from torch.distributed.checkpoint.planner import LoadItemType

METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}
MODULES = {"torch.distributed.checkpoint.metadata": metadata, "torch.distributed.checkpoint.filesystem": filesystem,
           "torch": torch, "torch.serialization": torch.serialization, "pathlib": pathlib, "collections": collections}


class UnsafeFileError(ValueError):
    """A checkpoint file that would run code if read; the message names the file and what it holds."""


class DamagedFileError(ValueError):
    """A checkpoint file that is not what DCP wrote (truncated, garbage)."""


def refused(path, what: str) -> UnsafeFileError:
    return UnsafeFileError(f"{path}: holds {what}, which the weights-only loader refuses; use only checkpoints "
                           f"this project wrote")


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_CLASSES:
            return getattr(MODULES[module], name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise refused(self.path, f"{module}.{name}")


def _load_metadata(path) -> metadata.Metadata:
    try:
        with open(path, "rb") as f:
            loaded = _MetadataUnpickler(f, path).load()
    except UnsafeFileError:
        raise
    except Exception as error:  # truncated or garbage: pickle raises a handful of types
        raise DamagedFileError(f"{path}: not DCP metadata ({type(error).__name__}: {str(error)[:120]}); the "
                               f"checkpoint is damaged: use another one") from None
    if not isinstance(loaded, metadata.Metadata):
        raise DamagedFileError(f"{path}: holds a {type(loaded).__name__}, not DCP metadata; use another checkpoint")
    return loaded


class _WeightsOnlyBytes:
    """DCP's load planner, except that byte items reach it re-serialised from a weights-only load."""

    def __init__(self, planner, path):
        self._planner, self._path = planner, path

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            plain = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise refused(f"{self._path} ({read_item.dest_index.fqn})", first_global(error)) from None
        safe = io.BytesIO()
        torch.save(plain, safe)  # our own pickle of plain data: what the planner unpickles is harmless
        safe.seek(0)
        self._planner.load_bytes(read_item, safe)


def first_global(error: Exception) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found else "an object"


class SafeFileSystemReader(dcp.FileSystemReader):
    """dcp.load(state, storage_reader=SafeFileSystemReader(folder)): DCP's reader, never running pickled code."""

    def read_metadata(self, *args, **kwargs) -> metadata.Metadata:
        loaded = _load_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(loaded, "storage_meta", None) is None:
            loaded.storage_meta = metadata.StorageMeta()
        loaded.storage_meta.load_id = self.load_id
        return loaded

    def read_data(self, plan, planner):
        if any(item.type == LoadItemType.BYTE_IO for item in plan.items):
            planner = _WeightsOnlyBytes(planner, self.path)
        return super().read_data(plan, planner)


def read_metadata(folder) -> metadata.Metadata:
    return SafeFileSystemReader(str(folder)).read_metadata()

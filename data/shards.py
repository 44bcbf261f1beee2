"""The on-disk format of a prepared corpus, and reading it back.

A prepared folder holds, per split, flat binary token shards (`train_000.bin`, ...; uint16 when the
vocabulary fits, else uint32) with documents joined by EOS, the tokenizer files, and `manifest.json`
describing all of it with per-shard checksums. `TokenStream` presents one split's shards as a single
token sequence through numpy memmaps, so opening never reads the corpus into memory.
"""

import json
from pathlib import Path

import numpy as np

from groundwork.errors import UserError
from groundwork.folders import write_durably
from groundwork.hashing import sha256_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: max_token_id recorded, folder marker


class DataError(UserError, ValueError):
    """Bad data input; the message is one line naming the file and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 0 or vocab_size > 2**32:
        raise DataError(f"vocab size {vocab_size} does not fit a uint32 token shard; use at most {2**32}")
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class ShardWriter:
    """Appends token arrays to `{split}_NNN.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.max_token_id = -1
        self._file = None
        self._room = 0

    def write(self, tokens: np.ndarray) -> None:
        if len(tokens):
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._room == 0:
                self._open_next()
            part, tokens = tokens[: self._room], tokens[self._room :]
            part.tofile(self._file)
            self._room -= len(part)
            self.shards[-1]["tokens"] += len(part)

    def _open_next(self) -> None:
        self._close_current()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._file = open(self.folder / name, "wb")
        self._room = self.shard_tokens
        self.shards.append({"file": name, "tokens": 0})

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1]["sha256"] = sha256_file(self.folder / self.shards[-1]["file"])
            self._file = None

    def close(self) -> list[dict]:
        self._close_current()
        return self.shards


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        hint = " (an interrupted prepare leaves only a .tmp folder)" if folder.exists() else ""
        raise DataError(f"{folder}: no {MANIFEST}{hint}; run: python -m data.prepare --source SRC --out {folder}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error}); re-run data.prepare with --overwrite") from error
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise DataError(
            f"{path}: format_version {version!r}, expected {FORMAT_VERSION}; "
            f"re-run data.prepare with --overwrite (or into a new --out)"
        )
    _check_fields(manifest, path)
    return manifest


def _check_fields(manifest: dict, path: Path) -> None:
    """The keys readers rely on, with their types: a hand-edited manifest fails here, in one line."""

    def need(node: object, key: str, kind: type, where: str):
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(
                f"{path}: {where}{key} is missing or not a {getattr(kind, '__name__', 'value')}; "
                f"re-run data.prepare with --overwrite"
            )
        return value

    tokenizer = need(manifest, "tokenizer", dict, "")
    vocab_size = need(tokenizer, "vocab_size", int, "tokenizer.")
    need(tokenizer, "sha256", str, "tokenizer.")
    need(tokenizer, "eos_id", int, "tokenizer.")
    if need(manifest, "dtype", str, "") not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype {manifest['dtype']!r} is not uint16 or uint32; re-run data.prepare")
    max_id = need(manifest, "max_token_id", int, "")
    if not 0 < vocab_size <= 2**32 or max_id >= vocab_size:
        raise DataError(
            f"{path}: tokens go up to id {max_id} but tokenizer.vocab_size is {vocab_size}; the "
            f"manifest was edited or is damaged: re-run data.prepare with --overwrite"
        )
    for name, split in need(manifest, "splits", dict, "").items():
        need(split, "tokens", int, f"splits.{name}.")
        for i, shard in enumerate(need(split, "shards", list, f"splits.{name}.")):
            for key, kind in (("file", str), ("tokens", int), ("sha256", str)):
                need(shard, key, kind, f"splits.{name}.shards[{i}].")
            if "/" in shard["file"] or shard["file"].startswith("."):
                raise DataError(
                    f"{path}: splits.{name}.shards[{i}].file {shard['file']!r} points outside the "
                    f"folder; re-run data.prepare"
                )


def check_tokenizer(
    manifest: dict, folder: Path, vocab_size: int | None = None, tokenizer_sha256: str | None = None
) -> None:
    """The model must use the tokenizer the shards were made with: same vocab size and same hash."""
    tok = manifest["tokenizer"]
    if vocab_size is not None and vocab_size != tok["vocab_size"]:
        raise DataError(
            f"{folder}: shards use a {tok['vocab_size']}-token vocabulary but the model has vocab_size "
            f"{vocab_size}; set the model's vocab_size to {tok['vocab_size']} or prepare with "
            f"--vocab-size {vocab_size}"
        )
    if tokenizer_sha256 is not None and tokenizer_sha256 != tok["sha256"]:
        raise DataError(
            f"{folder}: shards were made with tokenizer {tok['sha256'][:12]}, not the expected "
            f"{tokenizer_sha256[:12]}; train on data prepared with the model's tokenizer"
        )


class TokenStream:
    """One split of a prepared folder as a single sequence of tokens, backed by memmaps."""

    def __init__(self, folder: Path, split: str, verify_checksums: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.folder}: no split {split!r} in {MANIFEST} (has {list(self.manifest['splits'])})")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.arrays = []
        for shard in self.manifest["splits"][split]["shards"]:
            path = self.folder / shard["file"]
            expected_bytes = shard["tokens"] * self.dtype.itemsize
            actual_bytes = path.stat().st_size if path.is_file() else -1
            if actual_bytes != expected_bytes:
                state = (
                    "is missing" if actual_bytes < 0 else f"has {actual_bytes} bytes, manifest says {expected_bytes}"
                )
                raise DataError(f"{path}: shard {state}; re-run data.prepare with --overwrite")
            if verify_checksums and sha256_file(path) != shard["sha256"]:
                raise DataError(
                    f"{path}: checksum differs from {MANIFEST} (corrupted shard); re-run data.prepare with --overwrite"
                )
            self.arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] as int64, reading across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            local = start + filled - self.offsets[shard]
            piece = self.arrays[shard][local : local + length - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out


def write_manifest(folder: Path, manifest: dict) -> None:
    write_durably(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

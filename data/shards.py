"""The on-disk format of a prepared corpus, and reading it back.

A prepared folder holds, per split, flat binary token shards (`train_000.bin`, ...; uint16 when the
vocabulary fits, else uint32) with documents joined by EOS, the tokenizer files, and `manifest.json`
describing all of it with per-shard checksums. `TokenStream` presents one split's shards as a single
token sequence through numpy memmaps, so opening never reads the corpus into memory.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from groundwork.errors import UserError
from groundwork.folders import write_durably
from groundwork.hashing import CHUNK_BYTES, sha256_file
from groundwork.untrusted import UntrustedFileError, read_bytes, read_json_object, regular_file, whole_number

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: max_token_id recorded, folder marker
REDO = "re-run data.prepare with --overwrite"
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_TOKENS = 2**48  # far beyond any corpus; a count above it is an edit, not data
_EMPTY = np.zeros(0, dtype=np.uint16)


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
            self._file.write(part.tobytes())  # tofile can lose a failed write (a full disk) without a word
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
    """A prepared folder's manifest, every field a reader uses checked (types, ranges, shard names confined to
    the folder, counts that add up): anyone can edit it, so nothing in it is used before this."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        hint = " (an interrupted prepare leaves only a .tmp folder)" if folder.exists() else ""
        raise DataError(f"{folder}: no {MANIFEST}{hint}; run: python -m data.prepare --source SRC --out {folder}")
    try:
        manifest = read_json_object(path, "manifest", REDO)
    except UntrustedFileError as error:
        raise DataError(str(error)) from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}; "
            f"re-run data.prepare with --overwrite (or into a new --out)"
        )
    try:
        _check_fields(manifest, path)
    except UntrustedFileError as error:
        raise DataError(str(error)) from None
    return manifest


def _check_fields(manifest: dict, path: Path) -> None:
    """The keys readers rely on, with their types and ranges: a hand-edited manifest fails here, in one line."""

    def need(node: object, key: str, kind: type, where: str):
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(f"{path}: {where}{key} is missing or not a {getattr(kind, '__name__', 'value')}; {REDO}")
        return value

    def number(node: dict, key: str, where: str, low: int = 0, high: int = MAX_TOKENS) -> int:
        return whole_number(need(node, key, int, where), f"{path}: {where}{key}", REDO, low, high)

    def digest(node: dict, key: str, where: str) -> None:
        if not SHA256.fullmatch(need(node, key, str, where)):
            raise DataError(f"{path}: {where}{key} is not a sha256 (64 hex digits); {REDO}")

    tokenizer = need(manifest, "tokenizer", dict, "")
    vocab_size = number(tokenizer, "vocab_size", "tokenizer.", 1, 2**32)
    digest(tokenizer, "sha256", "tokenizer.")
    for key in ("pad_id", "bos_id", "eos_id", "unk_id"):
        if key == "eos_id" or key in tokenizer:
            number(tokenizer, key, "tokenizer.", 0, vocab_size - 1)
    dtype = need(manifest, "dtype", str, "")
    if dtype != token_dtype(vocab_size).name:
        raise DataError(
            f"{path}: dtype {dtype!r} does not match tokenizer.vocab_size {vocab_size} (which needs "
            f"{token_dtype(vocab_size).name}); {REDO}"
        )
    max_id = need(manifest, "max_token_id", int, "")
    if not 0 <= max_id < vocab_size:
        raise DataError(
            f"{path}: tokens go up to id {max_id} but tokenizer.vocab_size is {vocab_size}; the "
            f"manifest was edited or is damaged: re-run data.prepare with --overwrite"
        )
    files = set()
    for name, split in need(manifest, "splits", dict, "").items():
        where = f"splits.{name}."
        tokens = number(split, "tokens", where)
        if "documents" in split:
            number(split, "documents", where, 0, tokens)
        if "max_token_id" in split:
            number(split, "max_token_id", where, -1, vocab_size - 1)
        total = 0
        for i, shard in enumerate(need(split, "shards", list, where)):
            at = f"{where}shards[{i}]."
            total += number(shard, "tokens", at)
            digest(shard, "sha256", at)
            file = need(shard, "file", str, at)
            if file in ("", ".", "..") or any(c in file for c in "/\\\0") or file.startswith("."):
                raise DataError(f"{path}: {at}file {file!r} points outside the folder; re-run data.prepare")
            if file in files:
                raise DataError(f"{path}: {at}file {file!r} is listed twice; {REDO}")
            files.add(file)
        if total != tokens:
            raise DataError(f"{path}: {where}tokens is {tokens} but its shards hold {total}; {REDO}")


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
    """One split of a prepared folder as a single sequence of tokens, backed by memmaps.

    With verify_checksums, every shard is read once before use: its sha256 against the manifest and its
    largest token id against the vocabulary (whoever edits a shard can also rewrite its digest; an id
    beyond the vocabulary would only fail inside the model's embedding), and tokenizer.json against the
    manifest's tokenizer.sha256."""

    def __init__(self, folder: Path, split: str, verify_checksums: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.folder}: no split {split!r} in {MANIFEST} (has {list(self.manifest['splits'])})")
        if self.manifest["splits"][split]["tokens"] == 0:
            way = "a --val-fraction above 0" if split == "val" else "more data"
            raise DataError(
                f"{self.folder}: the {split} split is empty; prepare it again with python -m data.prepare "
                f"--overwrite and {way}"
            )
        self.dtype = np.dtype(self.manifest["dtype"])
        vocab_size = self.manifest["tokenizer"]["vocab_size"]
        if verify_checksums:
            _check_tokenizer_file(self.folder, self.manifest["tokenizer"]["sha256"])
        self.arrays = []
        for shard in self.manifest["splits"][split]["shards"]:
            path = self.folder / shard["file"]
            expected_bytes = shard["tokens"] * self.dtype.itemsize
            actual_bytes = _shard_size(path)
            if actual_bytes != expected_bytes:
                state = (
                    "is missing" if actual_bytes < 0 else f"has {actual_bytes} bytes, manifest says {expected_bytes}"
                )
                raise DataError(f"{path}: shard {state}; re-run data.prepare with --overwrite")
            if verify_checksums:
                sha256, top = _scan(path, self.dtype)
                if sha256 != shard["sha256"]:
                    raise DataError(
                        f"{path}: checksum differs from {MANIFEST} (corrupted shard); re-run data.prepare with "
                        f"--overwrite"
                    )
                if top >= vocab_size:
                    raise DataError(
                        f"{path}: holds token id {top}, outside the tokenizer's {vocab_size}-token vocabulary "
                        f"(the shard or {MANIFEST} was edited); re-run data.prepare with --overwrite"
                    )
            self.arrays.append(np.memmap(path, dtype=self.dtype, mode="r") if expected_bytes else _EMPTY)
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


def _shard_size(path: Path) -> int:
    """A shard's size in bytes, -1 if it is missing; one line if it is a symlink, FIFO or folder."""
    try:
        regular_file(path, "shard", REDO)
    except UntrustedFileError as error:
        if not path.exists() and not path.is_symlink():
            return -1
        raise DataError(str(error)) from None
    return path.lstat().st_size


def _scan(path: Path, dtype: np.dtype) -> tuple[str, int]:
    """sha256 and largest token id of a shard, in one read of its bytes."""
    digest, top = hashlib.sha256(), -1
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        while chunk := f.read(CHUNK_BYTES):  # a multiple of the item size
            digest.update(chunk)
            top = max(top, int(np.frombuffer(chunk, dtype).max()))
    return digest.hexdigest(), top


def _check_tokenizer_file(folder: Path, sha256: str) -> None:
    path = folder / "tokenizer.json"
    try:
        content = read_bytes(path, "tokenizer", REDO, limit=256 << 20)
    except UntrustedFileError as error:
        raise DataError(str(error)) from None
    if hashlib.sha256(content).hexdigest() != sha256:
        raise DataError(
            f"{path}: differs from the tokenizer the shards were made with ({MANIFEST} tokenizer.sha256); {REDO}"
        )


def write_manifest(folder: Path, manifest: dict) -> None:
    write_durably(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

"""File digests read in chunks, with any hashlib or xxhash object: sha256 for the shard checksums a
manifest publishes, xxh3-128 for checkpoint files (train/checkpoint.py)."""

import hashlib
from pathlib import Path
from typing import Protocol

CHUNK_BYTES = 1 << 24


class Digest(Protocol):
    """What hash_file needs of a digest: hashlib's and xxhash's objects both have it."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def hash_file(path: Path, digest: Digest, chunk_bytes: int = CHUNK_BYTES) -> str:
    """`digest` (a hashlib or xxhash object) of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return hash_file(path, hashlib.sha256())

"""Reading a file the user (or anyone) may have edited: a checkpoint's, an export's, a manifest, a config.

Digests catch damage, not edits: whoever edits a file can recompute them. So what a file says is checked
before it is used, and reading it is bounded by what such a file can honestly be: no symlink is followed
(it may point anywhere), nothing but a regular file is opened (a FIFO would block forever), a small file is
read only up to its limit, and a name read from a file is confined to its folder. Each refusal is one line
naming the file and the way on.
"""

import json
import os
import stat
from pathlib import Path

from .errors import UserError

SMALL_FILE_BYTES = 16 << 20  # a JSON config, manifest, trainer state or marker is kilobytes; 16 MiB is generous


class UntrustedFileError(UserError, ValueError):
    """A file that is not what its folder says it is; one line: the file and the way on."""


def regular_file(path: Path, what: str, fix: str) -> Path:
    """`path` itself a regular file (not a symlink, folder, FIFO or device), or one line naming it."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise UntrustedFileError(f"{what} {path}: missing; {fix}") from None
    except OSError as error:
        raise UntrustedFileError(f"{what} {path}: unreadable ({error.strerror}); {fix}") from None
    if stat.S_ISLNK(mode):
        raise UntrustedFileError(f"{what} {path}: is a symlink, which is not followed; {fix}")
    if not stat.S_ISREG(mode):
        raise UntrustedFileError(f"{what} {path}: not a regular file; {fix}")
    return path


def read_bytes(path: Path, what: str, fix: str, limit: int = SMALL_FILE_BYTES) -> bytes:
    """The whole of a small regular file, or one line if it is not one or is larger than `limit`."""
    regular_file(path, what, fix)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            content = f.read(limit + 1)
    except OSError as error:
        raise UntrustedFileError(f"{what} {path}: unreadable ({error.strerror}); {fix}") from None
    if len(content) > limit:
        raise UntrustedFileError(f"{what} {path}: larger than {limit >> 20} MiB, not a file of this kind; {fix}")
    return content


def read_text(path: Path, what: str, fix: str, limit: int = SMALL_FILE_BYTES) -> str:
    try:
        return read_bytes(path, what, fix, limit).decode("utf-8")
    except UnicodeDecodeError as error:
        raise UntrustedFileError(f"{what} {path}: not UTF-8 text (byte {error.start}); {fix}") from None


def read_json_object(path: Path, what: str, fix: str, limit: int = SMALL_FILE_BYTES) -> dict:
    """A JSON object from a small regular file, or one line naming the file."""
    text = read_text(path, what, fix, limit)
    try:
        value = json.loads(text)
    except ValueError as error:
        raise UntrustedFileError(f"{what} {path}: not valid JSON ({str(error).splitlines()[0]}); {fix}") from None
    if not isinstance(value, dict):
        raise UntrustedFileError(f"{what} {path}: not a JSON object; {fix}")
    return value


def name_inside(folder: Path, name: object, what: str, fix: str) -> Path:
    """A file name read from a file in `folder`, confined to it: one plain name, no separators, no `..`,
    not a symlink. Returns the path in the folder."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UntrustedFileError(f"{what} in {folder}: names {name!r}, not a file of that folder; {fix}")
    path = Path(folder) / name
    if path.is_symlink():
        raise UntrustedFileError(f"{what} in {folder}: {name} is a symlink, which is not followed; {fix}")
    return path


def whole_number(value: object, what: str, fix: str, low: int = 0, high: int = 2**63 - 1) -> int:
    """An int read from a file (not a bool, not a float) within [low, high], or one line naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UntrustedFileError(f"{what}: {value!r} is not a whole number from {low} to {high}; {fix}")
    return value

"""The folders minicolossus makes, and the rules that keep everything else safe from it.

Every folder the project creates (a run, its checkpoint folder, one checkpoint, prepared data, an export)
carries a small marker file naming its kind. Cleanup, pruning and overwriting touch only folders marked
with the kind they expect; anything else is refused with one line naming the path and what would proceed.
New folders appear atomically: written under a temporary name (itself marked, so an interrupted write is
recognisably ours), fsynced, then renamed into place; replacing a finished folder moves the old one aside
first and removes it only after the new one is in. A run holds a lock in its folder (`RunLock`) so that
two runs never share one; a tool writing one output holds a lock beside it (`OutputLock`).

No symlink is followed when writing, replacing or deleting: a symlinked folder or file where the project
would write is refused in one line. A single file a tool writes outside its own folders (a plot, say) is
created new, or replaced only if the project wrote it (`write_file`).
"""

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

MARKER = ".minicolossus.json"
KINDS = ("run", "checkpoints", "checkpoint", "data", "export", "prepare-work")


class FolderError(UserError, ValueError):
    """A folder the project will not touch, or a run already holding it; one line: the path and the way on."""


def refuse_symlink(path: Path, what: str) -> None:
    """Nothing is written, replaced or deleted through a symlink: it may point at anything of the user's."""
    if Path(path).is_symlink():
        raise FolderError(f"{what} {path}: is a symlink; give the real path (nothing is written through a symlink)")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in this folder durable (a crash can otherwise forget it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, content: str | bytes) -> None:
    """Write a small file whole or not at all: temp file, fsync, rename. The rename replaces a symlink at
    `path` itself, never what it points to; the temporary file is created new (O_EXCL), so a planted link
    at its name is refused by the kernel instead of followed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:  # never removed here: it may not be ours (a planted file or link)
        raise FolderError(
            f"{tmp} already exists (a write killed midway under this process id, or not this project's); remove "
            f"it and run again"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def check_file_writable(path: Path, what: str, ours: Callable[[Path], bool]) -> None:
    """What `write_file` refuses, checkable before any heavy work: a symlink, a folder, or a file the
    project did not write (`ours(path)` says whether it did)."""
    path = Path(path)
    refuse_symlink(path, what)
    if path.is_dir():
        raise FolderError(f"{what} {path}: is a folder; give a file name")
    if path.exists() and not ours(path):
        raise FolderError(f"{what} {path}: exists and minicolossus did not write it; choose a new file name")


def write_file(path: Path, content: str | bytes, what: str, ours: Callable[[Path], bool]) -> None:
    """Create `path` whole, or replace it if the project wrote it; never through a symlink."""
    check_file_writable(path, what, ours)
    write_durably(path, content)


def mark(folder: Path, kind: str) -> None:
    assert kind in KINDS, kind
    write_durably(Path(folder) / MARKER, json.dumps({"kind": kind, "made_by": "minicolossus"}) + "\n")


def kind_of(folder: Path) -> str | None:
    """The kind this project marked the folder with; None for anything it did not make."""
    folder = Path(folder)
    marker = folder / MARKER
    if folder.is_symlink() or marker.is_symlink() or not marker.is_file():
        return None  # a link to one of ours is not ours (deleting through it would delete the target)
    try:
        with open(marker, "rb") as f:
            kind = json.loads(f.read(4096)).get("kind")  # a marker is a few bytes: a big file is not one
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in KINDS else None


def _is_empty(folder: Path) -> bool:
    return not any(Path(folder).iterdir())


def _only_marker_files(folder: Path) -> bool:
    """A folder holding nothing but (the start of) our marker: nothing in it to lose."""
    if not Path(folder).is_dir():
        return False
    return all(
        entry.is_file() and (entry.name == MARKER or entry.name.startswith(f".{MARKER}.tmp-"))
        for entry in Path(folder).iterdir()
    )


def _only_ours(folder: Path) -> bool:
    """Everything in it is a folder this project made (e.g. a checkpoint copied into a new run folder)."""
    return all(
        path.is_dir() and not path.is_symlink() and (kind_of(path) is not None or _only_ours(path))
        for path in Path(folder).iterdir()
    )


def claim(folder: Path, kind: str, what: str, create: bool = True) -> Path:
    """Make `folder` ours of `kind`: create and mark it if it is missing, empty or holds only folders this
    project made; accept it if it already carries that marker; refuse anything else. `create=False` only
    checks (ranks other than 0)."""
    folder = Path(folder)
    refuse_symlink(folder, what)
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"{what} {folder}: is a file, not a folder; choose another path")
    if folder.is_dir() and not _is_empty(folder):
        found = kind_of(folder)
        if found == kind:
            return folder
        if found is None and _only_ours(folder):
            if create:
                mark(folder, kind)
            return folder
        made = f"a minicolossus {found} folder" if found else "files minicolossus did not make"
        raise FolderError(f"{what} {folder}: holds {made} (no {kind} marker {MARKER}); choose a new or empty folder")
    if create:
        folder.mkdir(parents=True, exist_ok=True)
        mark(folder, kind)
    return folder


def remove(folder: Path, kind: str) -> None:
    """Delete a folder, but only one this project marked as `kind`."""
    folder = Path(folder)
    if folder.is_symlink() or kind_of(folder) != kind:
        raise FolderError(f"{folder}: not a minicolossus {kind} folder (no {MARKER} of that kind); left in place")
    shutil.rmtree(folder)


def check_replaceable(final: Path, kind: str, what: str, overwrite: bool) -> None:
    """What `begin` refuses, checkable before any heavy work."""
    final = Path(final)
    refuse_symlink(final, what)
    if not final.exists() or (final.is_dir() and _is_empty(final)):
        return
    found = kind_of(final) if final.is_dir() else None
    if found != kind:
        made = f"a minicolossus {found} folder" if found else "a file or folder minicolossus did not make"
        raise FolderError(f"{what} {final}: exists and is {made}; choose a new {what}")
    if not overwrite:
        raise FolderError(
            f"{what} {final}: exists (a minicolossus {kind} folder); pass --overwrite to replace it, "
            f"or choose a new {what}"
        )


def begin(final: Path, kind: str, tmp_name: str | None = None) -> Path:
    """A marked temporary folder next to `final`, to be completed with `commit`."""
    final = Path(final)
    tmp = final.with_name(tmp_name or f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():  # an interrupted attempt at the same name: ours only if marked
        remove(tmp, kind)
    # Marked under a staging name, then renamed: a kill can never leave an unmarked `tmp` behind.
    staging = final.with_name(f".{final.name}.new-{os.getpid()}")
    if _only_marker_files(staging):
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    mark(staging, kind)
    os.rename(staging, tmp)
    return tmp


def commit(tmp: Path, final: Path, kind: str) -> Path:
    """Rename a finished temporary folder into place. A finished folder already there (of the same kind)
    is moved aside first and removed only once the new one is in, so a crash leaves one of the two whole."""
    tmp, final = Path(tmp), Path(final)
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_file(path)
    fsync_dir(tmp)
    old = None
    if final.is_dir() and _is_empty(final):
        final.rmdir()  # an empty folder made for us to fill: nothing in it to lose
    if final.exists():
        if kind_of(final) != kind:
            raise FolderError(f"{final}: exists and is not a minicolossus {kind} folder; left in place")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old is not None:
        remove(old, kind)
    return final


def remove_leftovers(parent: Path, name: str, kind: str) -> None:
    """Temporary and moved-aside folders of `name` that a killed process left (marked ones only)."""
    parent = Path(parent)
    if parent.is_dir():
        for path in parent.glob(f".{name}.*-*"):
            if path.is_symlink():
                continue
            if path.name.startswith((f".{name}.tmp-", f".{name}.old-")) and kind_of(path) == kind:
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith(f".{name}.new-") and _only_marker_files(path):  # killed while marking
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: Path, kind: str, what: str, overwrite: bool = False):
    """with atomic_folder(OUT, "export", "OUT") as tmp: write into tmp; OUT appears when the block ends."""
    check_replaceable(final, kind, what, overwrite)
    Path(final).parent.mkdir(parents=True, exist_ok=True)
    tmp = begin(final, kind)
    try:
        yield tmp
        commit(tmp, final, kind)
    finally:
        if kind_of(tmp) == kind:  # still there: the block failed (after commit it is `final`)
            shutil.rmtree(tmp, ignore_errors=True)


# --- one run per folder ------------------------------------------------------------------------------

LOCK = ".lock"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (so a recycled pid is not mistaken for the lock's holder)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = _process_start(pid)
    return started is None or holder.get("pid_start") in (None, started)


class RunLock:
    """`{folder}/.lock`: host, pid and start time of the run using the folder. A second run stops in one
    line naming the holder; a lock left by a dead process on this host, or by an earlier attempt of the
    same torchrun job (same TORCHELASTIC_RUN_ID), is taken over."""

    user = "run"

    def __init__(self, folder: Path, what: str):
        self.target, self.path, self.what = Path(folder), Path(folder) / LOCK, what
        self.held = False

    def _mine(self) -> dict:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_id": run_id if run_id != "none" else None,
        }

    def _stale(self, holder: dict) -> bool:
        mine = self._mine()
        if holder.get("run_id") and holder.get("run_id") == mine["run_id"]:
            return True  # our own job's previous attempt (torchrun restarted it)
        return holder.get("host") == mine["host"] and not _alive(holder)

    def acquire(self) -> None:
        for _ in range(5):  # a few rounds: another process may be taking over the same stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if not holder and self.path.exists() and time.time() - self.path.lstat().st_mtime < 2:
                    time.sleep(0.2)  # maybe a lock being written this instant: look again
                    continue
                if holder and not self._stale(holder):
                    raise FolderError(
                        f"{self.what} {self.target}: in use by another {self.user} (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, since {holder.get('started')}); wait for it, stop it, or choose "
                        f"another {self.what}"
                    ) from None
                aside = self.path.with_name(f"{LOCK}.stale-{os.getpid()}")
                try:  # atomic: of two processes taking over, one wins the rename
                    os.rename(self.path, aside)
                    aside.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._mine()) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise FolderError(f"{self.what} {self.target}: could not take its lock {self.path}; retry")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if _read_holder(self.path).get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class OutputLock(RunLock):
    """`.{name}.lock` beside one output a tool writes (an export, a prepared data folder): a second tool
    writing the same output stops in one line naming the first, instead of both reporting success."""

    user = "process"

    def __init__(self, final: Path, what: str):
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        self.target, self.path, self.what = final, final.with_name(f".{final.name}{LOCK}"), what
        self.held = False


def _read_holder(path: Path) -> dict:
    """A lock file's holder; {} for anything that is not one (a link, a FIFO, a big or damaged file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            holder = json.loads(f.read(4096)) if os.fstat(f.fileno()).st_size <= 4096 else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}

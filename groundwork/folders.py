"""The folders minicolossus makes, and the rules that keep everything else safe from it.

Every folder the project creates (a run, its checkpoint folder, one checkpoint, prepared data, an export)
carries a small marker file naming its kind. Cleanup, pruning and overwriting touch only folders marked
with the kind they expect; anything else is refused with one line naming the path and what would proceed.
New folders appear atomically: written under a temporary name (itself marked, so an interrupted write is
recognisably ours), fsynced, then renamed into place; replacing a finished folder moves the old one aside
first and removes it only after the new one is in. A run holds a lock in its folder (`RunLock`) so that
two runs never share one.
"""

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from .errors import UserError

MARKER = ".minicolossus.json"
KINDS = ("run", "checkpoints", "checkpoint", "data", "export")


class FolderError(UserError, ValueError):
    """A folder the project will not touch, or a run already holding it; one line: the path and the way on."""


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
    """Write a small file whole or not at all: temp file, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def mark(folder: Path, kind: str) -> None:
    assert kind in KINDS, kind
    write_durably(Path(folder) / MARKER, json.dumps({"kind": kind, "made_by": "minicolossus"}) + "\n")


def kind_of(folder: Path) -> str | None:
    """The kind this project marked the folder with; None for anything it did not make."""
    try:
        kind = json.loads((Path(folder) / MARKER).read_text()).get("kind")
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
    if kind_of(folder) != kind:
        raise FolderError(f"{folder}: not a minicolossus {kind} folder (no {MARKER} of that kind); left in place")
    shutil.rmtree(folder)


def check_replaceable(final: Path, kind: str, what: str, overwrite: bool) -> None:
    """What `begin` refuses, checkable before any heavy work."""
    final = Path(final)
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

    def __init__(self, folder: Path, what: str):
        self.path, self.what = Path(folder) / LOCK, what
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
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                if not isinstance(holder, dict):
                    holder = {}
                if not holder and time.time() - self.path.stat().st_mtime < 2:
                    time.sleep(0.2)  # maybe a lock being written this instant: look again
                    continue
                if holder and not self._stale(holder):
                    raise FolderError(
                        f"{self.what} {self.path.parent}: in use by another run (pid {holder.get('pid')} on "
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
        raise FolderError(f"{self.what} {self.path.parent}: could not take its lock {self.path}; retry")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass

"""What a run reports: metrics.jsonl (one JSON object per log step, rank 0), a progress bar, TensorBoard.
`read_metrics` is the one reader of that file, so every tool treats a damaged or half-written one alike.

MFU = achieved model FLOP/s / the device's dense bf16 peak, with FLOPs from model.flops_per_token
(6 N_active + attention). CPUs have no entry in the peak table: there the achieved FLOP/s is reported.
"""

import json
import os
import resource
import stat
import time
from pathlib import Path

import torch

from groundwork.errors import UserError

# Dense bf16 peak FLOP/s per device (no sparsity), matched on the CUDA device name, first match wins:
# the PCIe and NVL parts run lower clocks than the SXM ones that "H100" / "H200" alone stand for.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200 NVL": 835e12,
    "H200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


MAX_ROW_BYTES = 1 << 20


class MetricsError(UserError, ValueError):
    """metrics.jsonl is missing or damaged: the message is one line naming the file."""


def _row(line: bytes) -> dict | None:
    try:
        row = json.loads(line)  # bytes: json decodes UTF-8 itself
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return None
    return row if isinstance(row, dict) and "step" in row else None


def read_metrics(run_dir: Path) -> list[dict]:
    """Every row of RUN_DIR/metrics.jsonl in file order (a resumed run logs the steps since its checkpoint
    again: callers that want one row per step keep the last).

    A last line that is not a row is one cut short by a kill mid-write (or read while being written) and is
    left out; a damaged line anywhere else is an error naming the file and the line.
    """
    path = Path(run_dir) / "metrics.jsonl"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the reader
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise MetricsError(f"{path}: not a regular file; pass a run folder (the run.out_dir of a training run)")
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        raise MetricsError(f"{path}: no such file; pass a run folder (the run.out_dir of a training run)") from None
    except OSError as error:
        raise MetricsError(f"{path}: cannot be read ({error.strerror or error})") from None
    last = lines.pop()  # after the final newline: nothing, or a row cut short
    rows = []
    for number, line in enumerate(lines, 1):
        if (row := _row(line)) is None:
            raise MetricsError(
                f"{path}: line {number} is not a metrics row (a JSON object with a step); the "
                f"file is damaged: restore it, or delete that line"
            )
        rows.append(row)
    if last.strip() and (row := _row(last)) is not None:  # complete, only its newline missing
        rows.append(row)
    return rows


def _open_run_file(path: Path, flags: int):
    """metrics.jsonl of this run, never through a symlink (start-up refuses one; this covers one planted since)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        raise MetricsError(
            f"{path}: cannot be written ({error.strerror}); it must be a regular file of this run, not a link"
        ) from None


def _end_last_row(path: Path) -> None:
    """Before appending to an existing metrics.jsonl: a last line left cut short by a killed run is removed,
    so that the next row is not glued onto it (read_metrics tolerates a damaged line only at the end)."""
    with os.fdopen(_open_run_file(path, os.O_RDWR), "rb+") as f:
        block_end = f.seek(0, 2)
        position = 0
        while block_end > 0:  # back to the last newline, a block at a time: the file grows with the run
            block_start = max(block_end - (1 << 16), 0)
            f.seek(block_start)
            newline = f.read(block_end - block_start).rfind(b"\n")
            if newline >= 0:
                position = block_start + newline + 1
                break
            block_end = block_start
        f.seek(position)
        last = f.read(MAX_ROW_BYTES + 1)  # a row is a few hundred bytes: a longer last line is not one
        if last.strip() and len(last) <= MAX_ROW_BYTES and _row(last) is not None:
            f.seek(0, 2)
            f.write(b"\n")
        else:
            f.truncate(position)


class MetricsLogger:
    def __init__(
        self,
        out_dir: Path,
        enabled: bool,
        flops_per_token: int,
        device: torch.device,
        max_steps: int,
        start_step: int,
        progress: bool,
        tensorboard: bool,
        every: int = 1,
    ):
        self.enabled, self.every = enabled, every
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device)
        self.path = Path(out_dir) / "metrics.jsonl"
        self._last_time, self._last_tokens = time.perf_counter(), None
        self.bar = self.tb = None
        if not enabled:
            return
        if self.path.exists() or self.path.is_symlink():
            _end_last_row(self.path)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

            self.tb = SummaryWriter(Path(out_dir) / "tensorboard")

    def due(self, step: int, last: bool, forced: bool) -> bool:
        """Every `log.every` steps, at the last step, and whenever `forced` (a validation or a skipped update
        is always logged)."""
        return step % self.every == 0 or last or forced

    def throughput(self, tokens_seen: int) -> dict:
        """tokens/s, FLOP/s and MFU since the previous call."""
        now = time.perf_counter()
        if self._last_tokens is None:
            self._last_time, self._last_tokens = now, tokens_seen
            return {}
        seconds, tokens = now - self._last_time, tokens_seen - self._last_tokens
        self._last_time, self._last_tokens = now, tokens_seen
        if tokens <= 0 or seconds <= 0:
            return {}
        flops = tokens * self.flops_per_token / seconds
        return {"tokens_per_s": tokens / seconds, "flops_per_s": flops, "mfu": flops / self.peak if self.peak else None}

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with os.fdopen(_open_run_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, row["step"])
        if self.bar is not None:
            shown = {k: row[k] for k in ("loss", "val_loss", "val_bpb") if row.get(k) is not None}
            if row.get("tokens_per_s"):
                shown["tok/s"] = row["tokens_per_s"]
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def note(self, line: str) -> None:
        """A line on the console (rank 0), above the progress bar if there is one."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()

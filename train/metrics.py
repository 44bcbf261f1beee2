"""What a run reports: metrics.jsonl (one JSON object per log step, rank 0), a progress bar, TensorBoard.

MFU = achieved model FLOP/s / the device's dense bf16 peak, with FLOPs from model.flops_per_token
(6 N_active + attention). CPUs have no entry in the peak table: there the achieved FLOP/s is reported.
"""

import json
import resource
import time
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s per device (no sparsity), matched on the CUDA device name, first match wins:
# the PCIe and NVL parts run lower clocks than the SXM ones that "H100" / "H200" alone stand for.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
                   "B200": 2250e12, "A100": 312e12, "L40S": 362e12}


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


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool, flops_per_token: int, device: torch.device,
                 max_steps: int, start_step: int, progress: bool, tensorboard: bool):
        self.enabled = enabled
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device)
        self.path = Path(out_dir) / "metrics.jsonl"
        self._last_time, self._last_tokens = time.perf_counter(), None
        self.bar = self.tb = None
        if not enabled:
            return
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
            self.tb = SummaryWriter(Path(out_dir) / "tensorboard")

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
        return {"tokens_per_s": tokens / seconds, "flops_per_s": flops,
                "mfu": flops / self.peak if self.peak else None}

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
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

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()

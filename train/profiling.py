"""A look inside chosen steps: `log.profile_steps = [START, STOP]` profiles steps START to STOP (inclusive)
with torch.profiler on every rank, and `log.memory_snapshot` records the CUDA allocator's history over the same
steps (GPU only). Everything goes to RUN/profile/:

- `rankR.*.pt.trace.json`: the trace, which Perfetto (ui.perfetto.dev) and TensorBoard's profiler open;
- `top_ops_rankR.txt`: the operators that took the most time, as a table;
- `memory_snapshot_rankR.pickle`: the allocator's snapshot, for pytorch.org/memory_viz (CUDA only).
"""

import sys
from pathlib import Path

import torch

PROFILE_FOLDER = "profile"


class StepProfiler:
    def __init__(self, window: list[int] | None, memory_snapshot: bool, out_dir: Path, device: torch.device, rank: int):
        self.window = window
        self.folder, self.device, self.rank = Path(out_dir) / PROFILE_FOLDER, device, rank
        self.memory = memory_snapshot and device.type == "cuda"
        if memory_snapshot and device.type != "cuda" and rank == 0:
            print(
                "log.memory_snapshot: the CUDA allocator's snapshot exists on a GPU only; not recorded", file=sys.stderr
            )
        self.profiler = None

    def step_begins(self, step: int) -> None:
        if self.window is None or step != self.window[0]:
            return
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

        self.folder.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.profiler = profile(
            activities=activities, on_trace_ready=tensorboard_trace_handler(str(self.folder), f"rank{self.rank}")
        )
        self.profiler.__enter__()
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def step_ends(self, step: int) -> None:
        if self.profiler is None or step != self.window[1]:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if self.memory:
            torch.cuda.memory._dump_snapshot(str(self.folder / f"memory_snapshot_rank{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.profiler.__exit__(None, None, None)  # writes the trace
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self.profiler.key_averages().table(sort_by=sort_by, row_limit=30)
        steps = self.window[1] - self.window[0] + 1
        (self.folder / f"top_ops_rank{self.rank}.txt").write_text(
            f"steps {self.window[0]}-{self.window[1]} ({steps}), rank {self.rank}, sorted by {sort_by}\n{table}\n"
        )
        self.profiler = None

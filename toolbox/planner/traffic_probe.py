"""Count what a real training step sends, to check the planner against: the trainer's second step runs under a
dispatch mode that sees every collective the step issues (DDP's reducer, FSDP's gathers and reductions,
DeepSpeed's, tp's and ep's alike), with its tensors and its process group, and turns each into the bytes this
rank sends by the ring formulas the planner uses (toolbox/planner/collectives.py). Run under torchrun:

    python -m torch.distributed.run --nproc_per_node=2 -m toolbox.planner.traffic_probe OUT.json <trainer args>

Each rank writes OUT.json.rankN: {"bytes": total, "by_collective": {op: bytes}}; under pipeline parallelism
also the seconds its schedule waited on its peers beside the seconds of the steps (PipelineWaits), and the
pipeline the trainer ran. What is counted is the collective the code asks for, not how gloo carries it out
(gloo has no reduce-scatter of its own and runs an all-reduce).
"""

import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import TorchDispatchMode


def tensor_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def group_size(args: Sequence[object]) -> int:
    for arg in args:
        if isinstance(arg, torch.ScriptObject) and "ProcessGroup" in str(arg._type()):
            return dist.ProcessGroup.unbox(arg).size()
    return dist.get_world_size()


def sent_bytes(op: str, args: Sequence[object], ranks: int) -> float:
    """What one rank sends for the collective `op` (c10d's op name) over a ring of `ranks`."""
    share = (ranks - 1) / ranks
    if op == "send":  # point to point (pipeline stages): the tensors go to one peer, whole
        return tensor_bytes(args[0])
    if op.startswith("recv"):
        return 0.0
    if op.startswith("allreduce"):
        return 2 * share * tensor_bytes(args[0])
    if op.startswith(("allgather", "_allgather")):  # (outputs, inputs): this rank's shard goes to every other
        return (ranks - 1) * tensor_bytes(args[1])
    if op.startswith(("reduce_scatter", "_reduce_scatter")):  # (outputs, inputs): the whole tensor in
        return share * tensor_bytes(args[1])
    if op.startswith("alltoall"):  # (outputs, inputs, ...)
        return share * tensor_bytes(args[1])
    return share * tensor_bytes(args[0])  # broadcast and the rest: the tensor, pipelined along the ring


COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all", "broadcast")


class CollectiveCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.by_collective = defaultdict(float)

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Sequence[type],
        args: Sequence[object] = (),
        kwargs: dict[str, object] | None = None,
    ) -> object:
        name = str(func)
        if name.startswith("c10d."):  # what torch.distributed, DDP and FSDP call: (outputs, inputs, group, ...)
            ranks = group_size(args)
            if ranks > 1:
                op = name.removeprefix("c10d.").split(".")[0]
                self.by_collective[op] += sent_bytes(op, args, ranks)
        elif name.startswith("_c10d_functional.") and any(kind in name for kind in COLLECTIVES):  # DTensor's
            names = [arg for arg in [*args, *(kwargs or {}).values()] if isinstance(arg, str)]
            ranks = _resolve_process_group(names[-1]).size() if names else group_size(args)
            if ranks > 1:
                op = name.removeprefix("_c10d_functional.").split(".")[0].replace("_into_tensor", "")
                op = (
                    op.replace("all_gather", "allgather")
                    .replace("all_reduce", "allreduce")
                    .replace("all_to_all", "alltoall")
                )
                # functional ops return their output: pass (None, input) so the input sits where c10d's does
                self.by_collective[op] += sent_bytes(op, (args[0], args[0]), ranks)
        return func(*args, **(kwargs or {}))


class PipelineWaits:
    """Under pipeline parallelism, the seconds a rank's schedule waits on its peers' sends (the bubble, and the
    transfers themselves), beside the seconds of the steps they fall in: from the third step on (the first
    builds lazy state, the second is counted by CollectiveCounter, which slows it)."""

    def __init__(self) -> None:
        self.wait_s = self.step_s = 0.0
        self.steps = 0
        self.timing = False
        from torch.distributed.pipelining import schedules

        self.schedules, self.original = schedules, getattr(schedules, "_wait_batch_p2p", None)
        if self.original is not None:  # torch's schedules call this module-level function for every wait
            schedules._wait_batch_p2p = self.timed

    def timed(self, work: list) -> None:
        start = time.perf_counter()
        self.original(work)
        if self.timing:
            self.wait_s += time.perf_counter() - start

    def step(self, run_step: Callable[[], dict], step: int) -> dict:
        self.timing = step >= 2
        start = time.perf_counter()
        result = run_step()
        if self.timing:
            self.step_s += time.perf_counter() - start
            self.steps += 1
        return result


def main(argv: list[str]) -> int:
    out, trainer_args = Path(argv[0]), argv[1:]
    from train import trainer as trainer_module
    from train.__main__ import main as train_main
    from train.parallel.pipeline_plan import stages_per_rank

    counter = CollectiveCounter()
    waits = PipelineWaits()
    original = trainer_module.Trainer.train_step

    pipeline = {}

    def probed(self: trainer_module.Trainer) -> dict:
        if self.engine.pipeline is not None:
            par = self.config.parallel
            pipeline.update(
                pp=par.pp_size,
                schedule=par.pp_schedule,
                virtual_stages=stages_per_rank(par.pp_schedule, par.pp_virtual_stages),
                micro_batches=self.grad_accumulation,
            )
        if self.step != 1:  # the second step: the first builds buckets and lazy state
            return waits.step(lambda: original(self), self.step)
        with counter:
            return original(self)

    trainer_module.Trainer.train_step = probed
    code = train_main(trainer_args)
    counted = dict(counter.by_collective)
    measured = {"bytes": sum(counted.values()), "by_collective": counted}
    if waits.steps and pipeline:
        measured.update(pipeline, pipeline_wait_s=waits.wait_s, step_s=waits.step_s, timed_steps=waits.steps)
    Path(f"{out}.rank{os.environ.get('RANK', 0)}").write_text(json.dumps(measured))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

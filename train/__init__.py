"""The trainer: `python -m train --config FILE` from one CPU process to many GPU nodes.

trainer.py       the loop, as phases (step, validate, log, checkpoint), and `run`
startup.py       every check that needs no process group; the run's folders and locks
batch_memory.py  batch sizes against the memory free for them, before the run
config.py        the one TOML schema (pydantic), the same at every scale
engine.py        the torch engine (none / ddp / fsdp / hsdp); deepspeed_engine.py: ZeRO 1/2/3
parallel/        parallelism applied from outside the model, one file per dimension
checkpoint.py    sharded, checksummed, resumable checkpoints (safe_dcp.py: loading that runs no code)
checkpoint_files.py  what a checkpoint's files say, checked before use (COMPLETE, trainer.json, RNG)
weights.py       a checkpoint's or an export's weights, for init_from and the tools
initialization.py, optim.py, metrics.py, validation.py, fault_injection.py, preemption.py
"""

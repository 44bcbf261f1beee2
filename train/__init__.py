"""Trainer: one config from a CPU to many nodes (DDP, FSDP2, HSDP), checkpoints and metrics."""

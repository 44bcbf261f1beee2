"""Tables for the trainer's pure arithmetic, each expected value worked out by hand from the definitions: the
learning-rate schedule (train/optim.py lr_at), the layout of the ranks (train/parallel/mesh.py layout_of) and
the batch split (train/config.py global_batch_sequences, grad_accumulation). The training tests cover them end
to end; these name the row that breaks."""

import math

import pytest

from train.config import ConfigError, OptimSection, load_config
from train.optim import lr_at
from train.parallel import Layout, layout_of

# load_config's validation is pydantic's at its oldest supported version there, and layout_of is imported with
# torch.distributed's device mesh: cheap enough for the oldest-versions run (scripts/test_oldest.sh)
pytestmark = pytest.mark.compat


# --- the learning-rate schedule -----------------------------------------------------------------------
#
#   step < warmup:  lr * (step + 1) / warmup                    (step 0 is already lr / warmup, never 0)
#   floor = lr * min_lr_ratio
#   constant:       lr
#   cosine:         floor + (lr - floor) * (1 + cos(pi * min(1, p))) / 2,  p = (step - warmup) / max(1, max_steps - warmup)
#   wsd:            lr until decay_start = max(warmup, int(max_steps * (1 - decay_fraction))),
#                   then lr - (lr - floor) * min(1, p),  p = (step - decay_start) / max(1, max_steps - decay_start)
#
# Rows: (schedule, lr, min_lr_ratio, warmup, decay_fraction, max_steps, step, expected). lr 1 keeps the
# arithmetic readable; one row per schedule uses 3e-3 to show everything scales with lr.

LR_ROWS = {
    # warmup: linear from lr / warmup at step 0 to lr at its last step, whatever the schedule after it
    "warmup-first-step": ("cosine", 1.0, 0.1, 4, 0.2, 100, 0, 0.25),  # 1 * 1 / 4
    "warmup-second-step": ("cosine", 1.0, 0.1, 4, 0.2, 100, 1, 0.5),  # 2 / 4
    "warmup-last-step": ("cosine", 1.0, 0.1, 4, 0.2, 100, 3, 1.0),  # 4 / 4
    "warmup-wsd": ("wsd", 1.0, 0.1, 4, 0.2, 100, 2, 0.75),  # 3 / 4
    "warmup-constant": ("constant", 1.0, 0.1, 4, 0.2, 100, 0, 0.25),
    "warmup-scales-with-lr": ("cosine", 3e-3, 0.1, 20, 0.2, 100, 0, 1.5e-4),  # 3e-3 / 20
    # cosine, warmup 4 of 100 steps, floor 0.1: p = (step - 4) / 96
    "cosine-peak-after-warmup": ("cosine", 1.0, 0.1, 4, 0.2, 100, 4, 1.0),  # p 0: cos 0 = 1
    "cosine-quarter": ("cosine", 1.0, 0.1, 4, 0.2, 100, 28, 0.1 + 0.45 * (1 + math.sqrt(0.5))),  # p 1/4
    "cosine-half": ("cosine", 1.0, 0.1, 4, 0.2, 100, 52, 0.55),  # p 1/2: cos = 0, 0.1 + 0.9 / 2
    "cosine-last-step": ("cosine", 1.0, 0.1, 4, 0.2, 100, 100, 0.1),  # p 1: the floor
    "cosine-past-the-end": ("cosine", 1.0, 0.1, 4, 0.2, 100, 150, 0.1),  # p capped at 1: stays on the floor
    "cosine-floor-zero": ("cosine", 1.0, 0.0, 4, 0.2, 100, 100, 0.0),
    "cosine-floor-scales-with-lr": ("cosine", 3e-3, 0.1, 4, 0.2, 100, 100, 3e-4),
    "cosine-no-warmup-step-0": ("cosine", 1.0, 0.1, 0, 0.2, 10, 0, 1.0),  # p 0 / 10
    "cosine-no-warmup-half": ("cosine", 1.0, 0.1, 0, 0.2, 10, 5, 0.55),  # p 5 / 10
    "cosine-warmup-as-long-as-the-run": ("cosine", 1.0, 0.1, 10, 0.2, 10, 10, 1.0),  # p 0 / max(1, 0): no 0 / 0
    "cosine-one-step-run": ("cosine", 1.0, 0.1, 0, 0.2, 1, 0, 1.0),  # p 0 / 1
    # wsd, warmup 4 of 100, decay_fraction 0.2: decay_start = max(4, int(100 * 0.8)) = 80, p = (step - 80) / 20
    "wsd-stable-after-warmup": ("wsd", 1.0, 0.1, 4, 0.2, 100, 4, 1.0),
    "wsd-stable-last-step": ("wsd", 1.0, 0.1, 4, 0.2, 100, 79, 1.0),
    "wsd-decay-first-step": ("wsd", 1.0, 0.1, 4, 0.2, 100, 80, 1.0),  # p 0
    "wsd-decay-half": ("wsd", 1.0, 0.1, 4, 0.2, 100, 90, 0.55),  # p 1/2: 1 - 0.9 / 2
    "wsd-last-step": ("wsd", 1.0, 0.1, 4, 0.2, 100, 100, 0.1),  # p 1: 1 - 0.9
    "wsd-past-the-end": ("wsd", 1.0, 0.1, 4, 0.2, 100, 120, 0.1),  # p capped at 1
    "wsd-floor-scales-with-lr": ("wsd", 3e-3, 0.1, 4, 0.2, 100, 100, 3e-4),
    # decay_fraction 1: decay_start = max(4, int(0)) = 4, the decay starts right after warmup: p = 48 / 96
    "wsd-all-decay": ("wsd", 1.0, 0.1, 4, 1.0, 100, 52, 0.55),
    # int() truncates: 10 * (1 - 0.25) = 7.5 -> decay_start 7, p = (8 - 7) / 3, 1 - 0.9 / 3
    "wsd-decay-start-truncated": ("wsd", 1.0, 0.1, 2, 0.25, 10, 7, 1.0),
    "wsd-decay-start-truncated-next": ("wsd", 1.0, 0.1, 2, 0.25, 10, 8, 0.7),
    # a warmup longer than the stable phase: decay_start = max(90, 80) = 90, p = 5 / 10
    "wsd-warmup-past-decay-start": ("wsd", 1.0, 0.1, 90, 0.2, 100, 95, 0.55),
    # constant: lr after warmup, min_lr_ratio ignored, also past max_steps
    "constant-after-warmup": ("constant", 1.0, 0.1, 4, 0.2, 100, 4, 1.0),
    "constant-last-step": ("constant", 1.0, 0.1, 4, 0.2, 100, 100, 1.0),
    "constant-past-the-end": ("constant", 3e-3, 0.1, 4, 0.2, 100, 1000, 3e-3),
}


@pytest.mark.parametrize(
    "schedule, lr, min_lr_ratio, warmup, decay_fraction, max_steps, step, expected",
    list(LR_ROWS.values()),
    ids=list(LR_ROWS),
)
def test_lr_at(schedule, lr, min_lr_ratio, warmup, decay_fraction, max_steps, step, expected):
    optim = OptimSection(
        schedule=schedule, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup, decay_fraction=decay_fraction
    )
    assert lr_at(step, max_steps, optim) == pytest.approx(expected, rel=1e-12, abs=1e-15)


# --- the layout of the ranks --------------------------------------------------------------------------
#
#   world 1: Layout() whatever the config (ep and tp collapse: the same config runs on a laptop)
#   ep or tp > 1 needs fsdp or hsdp; tp must divide the world
#   hsdp: shard = shard_size or max(local_world // tp, 1), replicate = replicate_size or world // (shard * tp),
#         and replicate * shard * tp must be the world;  others: replicate 1, shard = world // tp
#   ep must divide the shard * tp ranks of one replica
#
# Rows: (world size, local world size, parallel flags, Layout(replicate, shard, tp, ep) or the error).

LAYOUT_ROWS = {
    "one-process": (1, 1, [], Layout(1, 1, 1, 1)),
    "one-process-collapses-ep-and-tp": (1, 1, ["ep_size=4", "tp_size=2"], Layout(1, 1, 1, 1)),
    "one-process-any-strategy": (1, 1, ["strategy='ddp'", "ep_size=2"], Layout(1, 1, 1, 1)),
    "ddp": (2, 2, ["strategy='ddp'"], Layout(1, 2, 1, 1)),
    "deepspeed": (4, 4, ["strategy='deepspeed'"], Layout(1, 4, 1, 1)),
    "fsdp": (4, 4, [], Layout(1, 4, 1, 1)),
    "fsdp-tp2": (4, 4, ["tp_size=2"], Layout(1, 2, 2, 1)),  # shard 4 / 2
    "fsdp-ep2": (2, 2, ["ep_size=2"], Layout(1, 2, 1, 2)),
    "fsdp-tp2-ep4": (4, 4, ["tp_size=2", "ep_size=4"], Layout(1, 2, 2, 4)),  # ep 4 divides 2 x 2
    "fsdp-over-two-nodes": (4, 2, [], Layout(1, 4, 1, 1)),  # the local world matters to hsdp only
    "hsdp-shard-per-node": (4, 2, ["strategy='hsdp'"], Layout(2, 2, 1, 1)),  # shard 2 // 1, replicate 4 // 2
    "hsdp-one-process-per-node": (2, 1, ["strategy='hsdp'"], Layout(2, 1, 1, 1)),  # shard 1, replicate 2
    "hsdp-tp2": (8, 4, ["strategy='hsdp'", "tp_size=2"], Layout(2, 2, 2, 1)),  # shard 4 // 2, replicate 8 // 4
    "hsdp-tp-wider-than-a-node": (4, 1, ["strategy='hsdp'", "tp_size=2"], Layout(2, 1, 2, 1)),  # max(1 // 2, 1)
    "hsdp-explicit-2x1": (2, 2, ["strategy='hsdp'", "replicate_size=2", "shard_size=1"], Layout(2, 1, 1, 1)),
    "hsdp-explicit-1x2": (2, 2, ["strategy='hsdp'", "replicate_size=1", "shard_size=2"], Layout(1, 2, 1, 1)),
    "hsdp-shard-size-sets-replicate": (8, 8, ["strategy='hsdp'", "shard_size=2"], Layout(4, 2, 1, 1)),
    "hsdp-ep4-within-a-replica": (8, 8, ["strategy='hsdp'", "ep_size=4"], Layout(1, 8, 1, 4)),
    "fsdp-cp2": (4, 4, ["cp_size=2"], Layout(1, 2, 1, 1, cp=2)),
    "fsdp-cp2-ep2-borrows-the-cp-ranks": (2, 2, ["cp_size=2", "ep_size=2"], Layout(1, 1, 1, 2, cp=2)),
    "hsdp-cp2-tp2": (8, 4, ["strategy='hsdp'", "cp_size=2", "tp_size=2"], Layout(2, 1, 2, 1, cp=2)),  # 4 // (2 x 2)
    "ep-needs-fsdp": (
        2,
        2,
        ["strategy='ddp'", "ep_size=2"],
        "parallel.ep_size > 1 needs parallel.strategy fsdp or hsdp (not 'ddp'); change the strategy or set "
        "parallel.ep_size = 1",
    ),
    "tp-needs-fsdp": (
        2,
        2,
        ["strategy='deepspeed'", "tp_size=2"],
        "parallel.tp_size > 1 needs parallel.strategy fsdp or hsdp (not 'deepspeed'); change the strategy or set "
        "parallel.tp_size = 1",
    ),
    "ep-named-first": (  # both too: the ep flag is the one named
        2,
        2,
        ["strategy='none'", "ep_size=2", "tp_size=2"],
        "parallel.ep_size > 1 needs parallel.strategy fsdp or hsdp (not 'none'); change the strategy or set "
        "parallel.ep_size = 1",
    ),
    "tp-does-not-divide-the-world": (
        3,
        3,
        ["tp_size=2"],
        "parallel.tp_size 2 does not divide the world size 3; launch a multiple of 2 processes or change "
        "parallel.tp_size",
    ),
    "cp-needs-fsdp": (
        2,
        2,
        ["strategy='ddp'", "cp_size=2"],
        "parallel.cp_size > 1 needs parallel.strategy fsdp or hsdp (not 'ddp'); change the strategy or set "
        "parallel.cp_size = 1",
    ),
    "cp-and-tp-do-not-divide-the-world": (
        6,
        6,
        ["cp_size=2", "tp_size=2"],
        "parallel.cp_size 2 x parallel.tp_size 2 does not divide the world size 6; launch a multiple of 4 "
        "processes or change parallel.cp_size or parallel.tp_size",
    ),
    "ep-wider-than-the-ranks": (
        2,
        2,
        ["ep_size=4"],
        "parallel.ep_size 4 must divide the 2 data-parallel-shard x tensor ranks of a replica it borrows from; "
        "choose a divisor of 2",
    ),
    "ep-not-a-divisor": (  # shard 6 // 2 = 3: 3 x 2 = 6 ranks, 6 % 4 = 2
        6,
        6,
        ["tp_size=2", "ep_size=4"],
        "parallel.ep_size 4 must divide the 6 data-parallel-shard x tensor ranks of a replica it borrows from; "
        "choose a divisor of 6",
    ),
    "hsdp-ep-borrows-from-one-replica-only": (  # replicate 2 x shard 4: a replica has 4 ranks, not 8
        8,
        4,
        ["strategy='hsdp'", "ep_size=8"],
        "parallel.ep_size 8 must divide the 4 data-parallel-shard x tensor ranks of a replica it borrows from; "
        "choose a divisor of 4",
    ),
    "hsdp-replicate-times-node-is-not-the-world": (  # shard 8 from the node, 2 x 8 x 1 = 16
        8,
        8,
        ["strategy='hsdp'", "replicate_size=2"],
        "parallel.replicate_size 2 x parallel.shard_size 8 x parallel.tp_size 1 != world size 8; set them so "
        "their product is the number of processes",
    ),
    "hsdp-world-not-a-multiple-of-the-node": (  # shard 4, replicate 6 // 4 = 1: 1 x 4 x 1 = 4
        6,
        4,
        ["strategy='hsdp'"],
        "parallel.replicate_size 1 x parallel.shard_size 4 x parallel.tp_size 1 != world size 6; set them so "
        "their product is the number of processes",
    ),
    "hsdp-with-tp-too-many": (  # shard 1 given, replicate 3: 3 x 1 x 2 = 6
        4,
        4,
        ["strategy='hsdp'", "replicate_size=3", "shard_size=1", "tp_size=2"],
        "parallel.replicate_size 3 x parallel.shard_size 1 x parallel.tp_size 2 != world size 4; set them so "
        "their product is the number of processes",
    ),
}


@pytest.mark.parametrize("world, local_world, flags, expected", list(LAYOUT_ROWS.values()), ids=list(LAYOUT_ROWS))
def test_layout_of(world, local_world, flags, expected):
    # fsdp unless a row names its strategy (a later flag wins)
    config = load_config(None, ["--parallel.strategy='fsdp'", *(f"--parallel.{flag}" for flag in flags)])
    if isinstance(expected, Layout):
        layout = layout_of(config, world, local_world)
        assert layout == expected
        assert layout.world_size == world  # every rank has a place, and only one
    else:
        with pytest.raises(ConfigError) as refused:
            layout_of(config, world, local_world)
        assert str(refused.value) == expected


# --- the batch: sequences per step, and micro-batches per rank -----------------------------------------
#
#   sequences = global_batch_size, or global_batch_tokens / seq_len (which must divide), default 32
#   per step  = micro_batch_size x data-parallel ranks, which must divide the sequences; accumulation is the
#               quotient. Else the two nearest valid sizes, lower = max(per step, sequences // per step x per
#               step) and lower + per step, and a micro-batch that would do when the ranks divide the sequences.

SEQUENCE_ROWS = {
    "default": ([], 32),
    "sequences": (["--batch.global_batch_size=24"], 24),
    "sequences-ignore-seq-len": (["--batch.global_batch_size=24", "--data.seq_len=100"], 24),
    "tokens": (["--batch.global_batch_tokens=8192", "--data.seq_len=128"], 64),  # 8192 / 128
    "tokens-one-sequence": (["--batch.global_batch_tokens=64", "--data.seq_len=64"], 1),
    "tokens-not-a-multiple": (
        ["--batch.global_batch_tokens=1000", "--data.seq_len=64"],  # 1000 = 15 x 64 + 40
        "batch.global_batch_tokens 1000 is not a multiple of data.seq_len 64",
    ),
    "tokens-shorter-than-a-sequence": (
        ["--batch.global_batch_tokens=100", "--data.seq_len=128"],
        "batch.global_batch_tokens 100 is not a multiple of data.seq_len 128",
    ),
}


@pytest.mark.parametrize("flags, expected", list(SEQUENCE_ROWS.values()), ids=list(SEQUENCE_ROWS))
def test_global_batch_sequences(flags, expected):
    config = load_config(None, flags)
    if isinstance(expected, int):
        assert config.global_batch_sequences() == expected
    else:
        for derived in (config.global_batch_sequences, lambda: config.grad_accumulation(1)):
            with pytest.raises(ConfigError) as refused:
                derived()
            assert str(refused.value) == expected


def test_both_batch_sizes_are_refused_when_the_config_is_read(tmp_path):
    (tmp_path / "both.toml").write_text("[batch]\nglobal_batch_size = 8\nglobal_batch_tokens = 512\n")
    with pytest.raises(ConfigError) as refused:
        load_config(tmp_path / "both.toml")
    assert str(refused.value) == "batch: set only one of batch.global_batch_size and batch.global_batch_tokens"


def test_a_command_line_global_batch_replaces_the_other_form(tmp_path):
    (tmp_path / "c.toml").write_text("[batch]\nglobal_batch_size = 8\n")
    config = load_config(tmp_path / "c.toml", ["--batch.global_batch_tokens=1024", "--data.seq_len=64"])
    assert config.batch.global_batch_size is None and config.global_batch_sequences() == 16
    config = load_config(None, ["--batch.global_batch_tokens=1024", "--batch.global_batch_size=4"])  # the last
    assert config.batch.global_batch_tokens is None and config.global_batch_sequences() == 4


# Rows: (global batch in sequences, micro_batch_size, data-parallel ranks, accumulation or the error).
ACCUMULATION_ROWS = {
    "one-rank": (32, 8, 1, 4),  # 32 / 8
    "ranks-share-it": (32, 8, 4, 1),  # 32 / (8 x 4)
    "two-ranks-accumulate": (32, 4, 2, 4),  # 32 / 8
    "one-micro-batch": (8, 8, 1, 1),
    "one-sequence": (1, 1, 1, 1),
    "three-ranks": (24, 2, 3, 4),  # 24 / 6
    "one-sequence-per-rank": (24, 1, 24, 1),
    "not-divisible-one-rank": (  # per step 4: 10 = 2 x 4 + 2 -> 8 or 12; or one micro-batch of 10
        10,
        4,
        1,
        "batch.global_batch_size 10 is not divisible by micro_batch_size 4 x 1 data-parallel ranks; use 8 or 12 "
        "or batch.micro_batch_size 10",
    ),
    "not-divisible-two-ranks": (  # per step 16: 36 = 2 x 16 + 4 -> 32 or 48; 36 / 2 = 18
        36,
        8,
        2,
        "batch.global_batch_size 36 is not divisible by micro_batch_size 8 x 2 data-parallel ranks; use 32 or 48 "
        "or batch.micro_batch_size 18",
    ),
    "below-one-micro-batch-per-rank": (  # per step 128 > 32: lower max(128, 0) = 128, then 256; 32 / 16 = 2
        32,
        8,
        16,
        "batch.global_batch_size 32 is not divisible by micro_batch_size 8 x 16 data-parallel ranks; use 128 or "
        "256 or batch.micro_batch_size 2",
    ),
    "ranks-do-not-divide-the-batch": (  # per step 16: 30 -> 16 or 32; 30 % 4 = 2, no micro-batch fits
        30,
        4,
        4,
        "batch.global_batch_size 30 is not divisible by micro_batch_size 4 x 4 data-parallel ranks; use 16 or 32 "
        "(or change batch.micro_batch_size)",
    ),
    "fewer-sequences-than-ranks": (  # per step 4 > 3: 4 or 8; 3 < 4 ranks, no micro-batch fits
        3,
        1,
        4,
        "batch.global_batch_size 3 is not divisible by micro_batch_size 1 x 4 data-parallel ranks; use 4 or 8 "
        "(or change batch.micro_batch_size)",
    ),
}


@pytest.mark.parametrize(
    "sequences, micro, dp_size, expected", list(ACCUMULATION_ROWS.values()), ids=list(ACCUMULATION_ROWS)
)
def test_grad_accumulation(sequences, micro, dp_size, expected):
    config = load_config(None, [f"--batch.global_batch_size={sequences}", f"--batch.micro_batch_size={micro}"])
    if isinstance(expected, int):
        assert config.grad_accumulation(dp_size) == expected
    else:
        with pytest.raises(ConfigError) as refused:
            config.grad_accumulation(dp_size)
        assert str(refused.value) == expected


def test_grad_accumulation_counts_sequences_from_tokens():
    # 4096 tokens / 128 = 32 sequences; per step 2 x 4 = 8: 4 micro-batches per rank
    config = load_config(None, ["--batch.global_batch_tokens=4096", "--data.seq_len=128", "--batch.micro_batch_size=2"])
    assert config.grad_accumulation(4) == 4

"""How the world's ranks are split, decided in one place, and the device meshes that realise it.

Ranks are laid out row-major over (pp, dp_replicate, dp_shard, cp, tp): the ranks of one tensor-parallel group
are neighbours (one node's fast links), then the context-parallel ranks that share each sequence, then
data-parallel replicas (across nodes), and pipeline stages outermost (each stage a set of nodes). For world 8 = replicate 2 x shard 2 x tp 2, ranks
0,1 form a tp group and hold the same batch. A cp group reads the same sequences and each rank keeps its
chunks of them, so FSDP shards (and averages gradients) over dp_shard x cp, flattened into dp_shard_cp.

Expert parallelism borrows ranks from the data-parallel shard dimension: the dp_shard x cp x tp ranks of one
replica are re-viewed as (expert_shard, ep). Each ep group of `ep` neighbouring ranks holds one copy of
all experts, E / ep each, and swaps tokens by all-to-all; expert weights are then sharded by FSDP over
the expert_shard ranks that hold the same experts. Dense weights stay sharded over all data-parallel
ranks. Two meshes, then:

    dense   (pp, dp_replicate, dp_shard, cp, tp)  attention, norms, router, embedding, dense/shared FFN
    expert  (pp, dp_replicate, expert_shard, ep)  the experts' stacked w_gate / w_up / w_down
"""

from dataclasses import dataclass
from enum import StrEnum

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from model import GrokConfig

from ..config import ConfigError, TrainConfig


class MeshAxis(StrEnum):
    """The one name of each mesh dimension (a DeviceMesh indexes its sub-meshes by these)."""

    PP = "pp"  # pipeline parallelism: ranks that hold different stages of the blocks
    DP_REPLICATE = "dp_replicate"  # data-parallel replicas (hsdp: across nodes)
    DP_SHARD = "dp_shard"  # data-parallel ranks that shard the dense weights
    CP = "cp"  # context parallelism: ranks that split each sequence
    DP_SHARD_CP = "dp_shard_cp"  # dp_shard x cp flattened: what FSDP shards dense weights over
    TP = "tp"  # tensor parallelism
    EXPERT_SHARD = "expert_shard"  # ranks of one replica that hold the same experts
    EP = "ep"  # expert parallelism: ranks that split the experts and swap tokens


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    ep: int = 1
    cp: int = 1
    pp: int = 1

    @property
    def dp_size(self) -> int:
        """Ranks that read different batches."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.stage_size

    @property
    def stage_size(self) -> int:
        """Ranks that run one pipeline stage (all of them without pp): their losses are shares of one mean."""
        return self.dp_size * self.cp * self.tp

    @property
    def expert_shard(self) -> int:
        """Ranks of one replica that hold the same experts (and shard them with FSDP)."""
        return self.dp_shard * self.cp * self.tp // self.ep

    def dp_rank(self, rank: int) -> int:
        return rank % self.stage_size // (self.cp * self.tp)

    def cp_rank(self, rank: int) -> int:
        """Which chunks of the group's sequences this rank keeps (see parallel/context.py)."""
        return rank // self.tp % self.cp

    def pp_rank(self, rank: int) -> int:
        return rank // self.stage_size

    def describe(self) -> str:
        parts = [f"dp {self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1 else f"dp {self.dp_shard}"]
        for name, size in (("pp", self.pp), ("cp", self.cp), ("tp", self.tp), ("ep", self.ep)):
            parts += [f"{name} {size}"] * (size > 1)
        return " x ".join(parts)


def layout_of(config: TrainConfig, world_size: int, local_world_size: int) -> Layout:
    """The layout a config asks for on this many ranks; a one-line ConfigError when it cannot be made.
    On one process expert, tensor and context parallelism collapse to 1, so the same config runs on a laptop."""
    par = config.parallel
    if world_size == 1:
        return Layout()
    split = {
        "parallel.ep_size": par.ep_size,
        "parallel.tp_size": par.tp_size,
        "parallel.cp_size": par.cp_size,
        "parallel.pp_size": par.pp_size,
    }
    for flag, size in split.items():
        if size > 1 and par.strategy not in ("fsdp", "hsdp"):
            raise ConfigError(
                f"{flag} > 1 needs parallel.strategy fsdp or hsdp (not {par.strategy!r}); change the "
                f"strategy or set {flag} = 1"
            )
    tp, ep, cp, pp = par.tp_size, par.ep_size, par.cp_size, par.pp_size
    if world_size % (pp * cp * tp):
        flags = [f"parallel.{name}_size" for name, size in (("pp", pp), ("cp", cp), ("tp", tp)) if size > 1]
        sizes = " x ".join(f"{flag} {par.model_dump()[flag.split('.')[1]]}" for flag in flags)
        raise ConfigError(
            f"{sizes} does not divide the world size {world_size}; launch a multiple of {pp * cp * tp} processes "
            f"or change {' or '.join(flags)}"
        )
    world_size //= pp  # what follows splits the ranks of one stage
    if par.strategy == "hsdp":
        shard = par.shard_size or max(local_world_size // (cp * tp), 1)
        replicate = par.replicate_size or world_size // (shard * cp * tp)
        if replicate * shard * cp * tp != world_size:
            raise ConfigError(
                f"parallel.replicate_size {replicate} x parallel.shard_size {shard}"
                f"{f' x parallel.cp_size {cp}' * (cp > 1)} x parallel.tp_size {tp} != "
                f"{f'the {world_size} ranks of a pipeline stage' if pp > 1 else f'world size {world_size}'}; "
                f"set them so their product is the number of processes"
            )
    else:
        replicate, shard = 1, world_size // (cp * tp)
    replica = shard * cp * tp
    if replica % ep:
        raise ConfigError(
            f"parallel.ep_size {ep} must divide the {replica} data-parallel-shard x tensor{' x context' * (cp > 1)} "
            f"ranks of a replica it borrows from; choose a divisor of {replica}"
        )
    return Layout(replicate, shard, tp, ep, cp, pp)


def check_model_fits(layout: Layout, model_config: GrokConfig, seq_len: int) -> None:
    """Sizes that the expert, context and tensor split must divide, named in one line."""
    if layout.ep > 1 and not model_config.is_moe:
        raise ConfigError("parallel.ep_size > 1 needs a mixture-of-experts model (num_local_experts > 1)")
    if layout.ep > 1 and model_config.num_local_experts % layout.ep:
        raise ConfigError(
            f"parallel.ep_size {layout.ep} must divide the model's {model_config.num_local_experts} "
            f"experts; choose a divisor of {model_config.num_local_experts}"
        )
    if layout.cp > 1 and seq_len % (2 * layout.cp):
        raise ConfigError(
            f"parallel.cp_size {layout.cp} splits each sequence into 2 x {layout.cp} equal chunks, which "
            f"data.seq_len {seq_len} is not a multiple of; choose a seq_len divisible by {2 * layout.cp}"
        )
    if layout.tp > 1:
        for name, size in (
            ("num_attention_heads", model_config.num_attention_heads),
            ("num_key_value_heads", model_config.num_key_value_heads),
            ("vocab_size", model_config.vocab_size),
            ("data.seq_len" + " / parallel.cp_size" * (layout.cp > 1), seq_len // layout.cp),
            ("intermediate_size", model_config.intermediate_size if not model_config.is_moe else 0),
            ("shared_intermediate_size", model_config.shared_intermediate_size),
        ):
            if size % layout.tp:
                where = name if "." in name else f"model {name}"
                raise ConfigError(
                    f"parallel.tp_size {layout.tp} must divide {where} ({size}); choose a divisor, or "
                    f"change it with model.overrides"
                )


@dataclass
class WorldMesh:
    layout: Layout
    dense: DeviceMesh
    expert: DeviceMesh | None  # None without expert parallelism
    shard_cp: DeviceMesh | None = None  # dp_shard x cp flattened; None without context parallelism

    @property
    def data_parallel(self) -> DeviceMesh:
        """What FSDP shards dense weights over: (replicate, shard) for hsdp, shard alone for fsdp; the shard
        dimension takes in the cp ranks, whose gradients are averaged like data-parallel ones."""
        shard = MeshAxis.DP_SHARD_CP if self.layout.cp > 1 else MeshAxis.DP_SHARD
        if self.layout.dp_replicate > 1:
            return self.dense[MeshAxis.DP_REPLICATE, shard]
        return self.shard_cp if self.shard_cp is not None else self.dense[shard]

    @property
    def pipeline_parallel(self) -> DeviceMesh:
        return self.dense[MeshAxis.PP]

    @property
    def context_parallel(self) -> DeviceMesh:
        return self.dense[MeshAxis.CP]

    @property
    def tensor_parallel(self) -> DeviceMesh:
        return self.dense[MeshAxis.TP]

    @property
    def expert_parallel(self) -> DeviceMesh:
        return self.expert[MeshAxis.EP]

    @property
    def expert_data_parallel(self) -> DeviceMesh:
        if self.layout.dp_replicate > 1:
            return self.expert[MeshAxis.DP_REPLICATE, MeshAxis.EXPERT_SHARD]
        return self.expert[MeshAxis.EXPERT_SHARD]


def build_world_mesh(layout: Layout, device_type: str) -> WorldMesh:
    dense = init_device_mesh(
        device_type,
        (layout.pp, layout.dp_replicate, layout.dp_shard, layout.cp, layout.tp),
        mesh_dim_names=(MeshAxis.PP, MeshAxis.DP_REPLICATE, MeshAxis.DP_SHARD, MeshAxis.CP, MeshAxis.TP),
    )
    shard_cp = None
    if layout.cp > 1:  # registered on the root mesh too, so that hsdp's 2-D mesh can name it
        shard_cp = dense[MeshAxis.DP_SHARD, MeshAxis.CP]._flatten(MeshAxis.DP_SHARD_CP)
    expert = None
    if layout.ep > 1:
        expert = init_device_mesh(
            device_type,
            (layout.pp, layout.dp_replicate, layout.expert_shard, layout.ep),
            mesh_dim_names=(MeshAxis.PP, MeshAxis.DP_REPLICATE, MeshAxis.EXPERT_SHARD, MeshAxis.EP),
        )
    return WorldMesh(layout, dense, expert, shard_cp)

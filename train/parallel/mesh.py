"""How the world's ranks are split, decided in one place, and the device meshes that realise it.

Ranks are laid out row-major over (dp_replicate, dp_shard, tp): the ranks of one tensor-parallel group
are neighbours (one node's fast links), data-parallel replicas are the outermost (across nodes). For
world 8 = replicate 2 x shard 2 x tp 2, ranks 0,1 form a tp group and hold the same batch.

Expert parallelism borrows ranks from the data-parallel shard dimension: the dp_shard x tp ranks of one
replica are re-viewed as (expert_shard, ep). Each ep group of `ep` neighbouring ranks holds one copy of
all experts, E / ep each, and swaps tokens by all-to-all; expert weights are then sharded by FSDP over
the expert_shard ranks that hold the same experts. Dense weights stay sharded over all data-parallel
ranks. Two meshes, then:

    dense   (dp_replicate, dp_shard, tp)      attention, norms, router, embedding, dense/shared FFN
    expert  (dp_replicate, expert_shard, ep)  the experts' stacked w_gate / w_up / w_down
"""

from dataclasses import dataclass
from enum import StrEnum

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from model import GrokConfig

from ..config import ConfigError, TrainConfig


class MeshAxis(StrEnum):
    """The one name of each mesh dimension (a DeviceMesh indexes its sub-meshes by these)."""

    DP_REPLICATE = "dp_replicate"  # data-parallel replicas (hsdp: across nodes)
    DP_SHARD = "dp_shard"  # data-parallel ranks that shard the dense weights
    TP = "tp"  # tensor parallelism
    EXPERT_SHARD = "expert_shard"  # ranks of one replica that hold the same experts
    EP = "ep"  # expert parallelism: ranks that split the experts and swap tokens


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    ep: int = 1

    @property
    def dp_size(self) -> int:
        """Ranks that read different batches."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp_size * self.tp

    @property
    def expert_shard(self) -> int:
        """Ranks of one replica that hold the same experts (and shard them with FSDP)."""
        return self.dp_shard * self.tp // self.ep

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def describe(self) -> str:
        parts = [f"dp {self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1 else f"dp {self.dp_shard}"]
        parts += [f"tp {self.tp}"] * (self.tp > 1) + [f"ep {self.ep}"] * (self.ep > 1)
        return " x ".join(parts)


def layout_of(config: TrainConfig, world_size: int, local_world_size: int) -> Layout:
    """The layout a config asks for on this many ranks; a one-line ConfigError when it cannot be made.
    On one process expert and tensor parallelism collapse to 1, so the same config runs on a laptop."""
    par = config.parallel
    if world_size == 1:
        return Layout()
    if (par.ep_size > 1 or par.tp_size > 1) and par.strategy not in ("fsdp", "hsdp"):
        flag = "parallel.ep_size" if par.ep_size > 1 else "parallel.tp_size"
        raise ConfigError(
            f"{flag} > 1 needs parallel.strategy fsdp or hsdp (not {par.strategy!r}); change the "
            f"strategy or set {flag} = 1"
        )
    tp, ep = par.tp_size, par.ep_size
    if world_size % tp:
        raise ConfigError(
            f"parallel.tp_size {tp} does not divide the world size {world_size}; launch a multiple "
            f"of {tp} processes or change parallel.tp_size"
        )
    if par.strategy == "hsdp":
        shard = par.shard_size or max(local_world_size // tp, 1)
        replicate = par.replicate_size or world_size // (shard * tp)
        if replicate * shard * tp != world_size:
            raise ConfigError(
                f"parallel.replicate_size {replicate} x parallel.shard_size {shard} x parallel.tp_size "
                f"{tp} != world size {world_size}; set them so their product is the number of processes"
            )
    else:
        replicate, shard = 1, world_size // tp
    if (shard * tp) % ep:
        raise ConfigError(
            f"parallel.ep_size {ep} must divide the {shard * tp} data-parallel-shard x tensor ranks of a "
            f"replica it borrows from; choose a divisor of {shard * tp}"
        )
    return Layout(replicate, shard, tp, ep)


def check_model_fits(layout: Layout, model_config: GrokConfig, seq_len: int) -> None:
    """Sizes that the expert and tensor split must divide, named in one line."""
    if layout.ep > 1 and not model_config.is_moe:
        raise ConfigError("parallel.ep_size > 1 needs a mixture-of-experts model (num_local_experts > 1)")
    if layout.ep > 1 and model_config.num_local_experts % layout.ep:
        raise ConfigError(
            f"parallel.ep_size {layout.ep} must divide the model's {model_config.num_local_experts} "
            f"experts; choose a divisor of {model_config.num_local_experts}"
        )
    if layout.tp > 1:
        for name, size in (
            ("num_attention_heads", model_config.num_attention_heads),
            ("num_key_value_heads", model_config.num_key_value_heads),
            ("vocab_size", model_config.vocab_size),
            ("data.seq_len", seq_len),
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

    @property
    def data_parallel(self) -> DeviceMesh:
        """What FSDP shards dense weights over: (replicate, shard) for hsdp, shard alone for fsdp."""
        if self.layout.dp_replicate > 1:
            return self.dense[MeshAxis.DP_REPLICATE, MeshAxis.DP_SHARD]
        return self.dense[MeshAxis.DP_SHARD]

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
        (layout.dp_replicate, layout.dp_shard, layout.tp),
        mesh_dim_names=(MeshAxis.DP_REPLICATE, MeshAxis.DP_SHARD, MeshAxis.TP),
    )
    expert = None
    if layout.ep > 1:
        expert = init_device_mesh(
            device_type,
            (layout.dp_replicate, layout.expert_shard, layout.ep),
            mesh_dim_names=(MeshAxis.DP_REPLICATE, MeshAxis.EXPERT_SHARD, MeshAxis.EP),
        )
    return WorldMesh(layout, dense, expert)

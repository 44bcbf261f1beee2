"""The machines a plan runs on: GPUs, the NVLink domain of a node, and the scale-out fabric.

Figures are the vendors' data-sheet numbers (dense bf16 tensor-core peak, HBM, NVLink bandwidth per GPU and
direction). What a job gets of them is a separate, stated assumption: `matmul_efficiency` (the share of the
peak that large training GEMMs sustain, with the attention kernels and elementwise work around them) and the
bus-bandwidth efficiency of collectives (`BUS_EFFICIENCY`), which is what NCCL's own benchmarks report for large
messages on these links.
"""

from dataclasses import dataclass

from train.metrics import PEAK_BF16_FLOPS

GIB = 2**30
# One figure for every GPU, not fitted per run: what large bf16 training GEMMs with their attention kernels and
# elementwise work sustain on Hopper and Ampere alike (cuBLAS reaches ~75-80% of peak on large GEMMs).
EFFICIENCY = 0.70


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16, FLOP/s
    memory_gib: float  # HBM
    nvlink_bytes_per_s: float  # per GPU, one direction, inside its node
    matmul_efficiency: float  # share of peak_flops that a well-tuned training step's compute sustains

    @property
    def usable_memory_gib(self) -> float:
        return 0.9 * self.memory_gib  # the CUDA context, the allocator's fragmentation, NCCL's own buffers


GPUS = {
    "h100": GPU("H100 SXM", PEAK_BF16_FLOPS["H100"], 80e9 / GIB, 450e9, EFFICIENCY),
    "h200": GPU("H200 SXM", PEAK_BF16_FLOPS["H200"], 141e9 / GIB, 450e9, EFFICIENCY),  # the H100's die, more HBM
    "h800": GPU("H800 SXM", PEAK_BF16_FLOPS["H100"], 80e9 / GIB, 200e9, EFFICIENCY),  # an H100 with 400 GB/s NVLink
    "b200": GPU("B200", PEAK_BF16_FLOPS["B200"], 180e9 / GIB, 900e9, EFFICIENCY),
    "a100": GPU("A100 SXM 80GB", PEAK_BF16_FLOPS["A100"], 80e9 / GIB, 300e9, EFFICIENCY),
}


@dataclass(frozen=True)
class Fabric:
    name: str
    bytes_per_s: float  # per GPU, one direction: each GPU has its own NIC (rail-optimised, as on Colossus)
    latency_s: float  # one hop of a collective's algorithm, NIC to NIC through the switches


FABRICS = {
    "roce400": Fabric("400 Gb/s RDMA over Ethernet per GPU (Colossus, Meta's RoCE cluster)", 400e9 / 8, 10e-6),
    "ib-ndr": Fabric("InfiniBand NDR 400 Gb/s per GPU", 400e9 / 8, 5e-6),
    "ib-hdr": Fabric("InfiniBand HDR 200 Gb/s per GPU", 200e9 / 8, 5e-6),
    # BLOOM's Jean Zay nodes: 4 Omni-Path links of 100 Gb/s for 8 GPUs
    "opa-4x100": Fabric("Omni-Path 4 x 100 Gb/s per node of 8 GPUs", 4 * 100e9 / 8 / 8, 5e-6),
}
NVLINK_LATENCY_S = 3e-6
BUS_EFFICIENCY = 0.8  # NCCL's large-message bus bandwidth against the links' line rate, NVLink and NICs alike


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    fabric: Fabric
    gpus_per_node: int = 8  # joined by NVLink / NVSwitch

    def link(self, group_size: int, stride: int) -> tuple[str, float, float]:
        """("nvlink" or "fabric", bytes/s per GPU, latency per hop) of the slowest link a group of `group_size`
        ranks crosses, whose members are `stride` ranks apart in the job's rank order (nodes hold consecutive
        ranks)."""
        if self.in_node(group_size, stride):
            return "nvlink", self.gpu.nvlink_bytes_per_s * BUS_EFFICIENCY, NVLINK_LATENCY_S
        return "fabric", self.fabric.bytes_per_s * BUS_EFFICIENCY, self.fabric.latency_s

    def in_node(self, group_size: int, stride: int) -> bool:
        return group_size <= 1 or group_size * stride <= self.gpus_per_node

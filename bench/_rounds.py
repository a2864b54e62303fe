"""What the job benches share: picking the round they report."""

from __future__ import annotations


def median_round(ratios: list[float]) -> int:
    """Index of the round whose ratio is the median (the lower of the two middle ones for an even count).

    The benches run every path back to back in each round, since this VM's speed drifts by up to 20 %
    within minutes, and report that round's numbers.
    """
    return sorted(range(len(ratios)), key=ratios.__getitem__)[(len(ratios) - 1) // 2]

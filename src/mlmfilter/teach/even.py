"""Splitting a target count evenly over groups of unequal size (clusters, score bins)."""

from __future__ import annotations

from typing import Sequence


def even_allocation(available: Sequence[int], target: int) -> list[int]:
    """Per group, how many to take: as equal as possible, never more than a group has, ``target`` in all
    (or everything, if the groups hold less). Small groups give all they have and the rest is shared by
    the others (water filling); a remainder goes one each to the first largest groups, so the result
    depends only on the sizes and their order."""
    counts = [0] * len(available)
    remaining = min(target, sum(available))
    open_groups = [i for i, a in enumerate(available) if a > 0]
    while remaining > 0 and open_groups:
        share = remaining // len(open_groups)
        if share == 0:  # fewer left than groups: one each, largest spare capacity first
            for i in sorted(open_groups, key=lambda g: (-(available[g] - counts[g]), g))[:remaining]:
                counts[i] += 1
            break
        for i in open_groups:
            take = min(share, available[i] - counts[i])
            counts[i] += take
            remaining -= take
        open_groups = [i for i in open_groups if counts[i] < available[i]]
    return counts

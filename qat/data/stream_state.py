"""A stream's resume state: each rank's position, and how a checkpoint of one world size resumes at
another (the rule is described in qat/data/stream.py: no document is read twice)."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Position:
    """The next document a rank looks at (the first it owns at or after g) and the tokens of g already used."""
    g: int = 0
    offset: int = 0


def reshard(state: dict, rank: int, world: int) -> tuple[Position, frozenset]:
    """This rank's start position and skip set from a checkpoint's stream state (the rule above)."""
    old_world, positions = state["world"], [Position(*p) for p in state["positions"]]
    skip = set(state["skip"])
    if old_world == world:
        return positions[rank], frozenset(skip)
    frontier = min(p.g for p in positions)
    consumed = {g for g in skip if g >= frontier}
    for r, p in enumerate(positions):
        first = frontier + (r - frontier) % old_world  # rank r's first document at or above the frontier
        consumed.update(range(first, p.g, old_world))
        if p.offset > 0:
            consumed.add(p.g)  # cut by a row end: counts as consumed, its rest is dropped
    return Position(frontier, 0), frozenset(consumed)


def merge_positions(positions: list[Position], world: int, skip: frozenset, docs_per_epoch,
                    order: Optional[dict] = None) -> dict:
    """The checkpoint's stream state; skip entries every rank has passed are dropped."""
    frontier = min(p.g for p in positions)
    return {"stream": True, "world": world, "positions": [[p.g, p.offset] for p in positions],
            "skip": sorted(g for g in skip if g >= frontier), "docs_per_epoch": docs_per_epoch, **(order or {})}

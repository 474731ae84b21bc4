"""Per-node packing of units onto the nodes of one GPU type.

A grant counts units per GPU type, but a unit needs all its GPUs on one node: two 4-GPU workers do not
fit on two nodes with 3 free GPUs each, although 6 GPUs are free. ``TypePacker`` keeps the free
capacity of one type's nodes as a histogram (free centi-GPUs -> number of nodes) and places units
best-fit, a batch at a time, so packing 10,000 units costs about as much as the number of distinct
free values, not the number of nodes.

Example: nodes of 8, 8 and 4 GPUs; place three 3-GPU units: best fit puts one on the 4-GPU node
(1 left) and two on an 8-GPU node (2 left); free histogram {100: 1, 200: 1, 800: 1}.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

CENTI = 100  # packing resolution: 1/100 GPU (Serve replicas use fractions such as 0.25 or 0.5)


def to_centi(gpus: float) -> int:
    """GPUs to integer centi-GPUs, rounding a unit's need up so that packing never over-commits."""
    return max(0, math.ceil(gpus * CENTI - 1e-6))


class TypePacker:
    """Free capacity of one GPU type's healthy nodes; places units best-fit."""

    __slots__ = ("hist", "_keys")

    def __init__(self, node_gpus: Iterable[float] = ()) -> None:
        self.hist: dict[int, int] = {}
        for g in node_gpus:
            c = math.floor(g * CENTI + 1e-6)
            if c > 0:
                self.hist[c] = self.hist.get(c, 0) + 1
        self._keys: list[int] | None = None

    def copy(self) -> TypePacker:
        p = TypePacker()
        p.hist = dict(self.hist)
        return p

    @property
    def free_gpus(self) -> float:
        return sum(f * c for f, c in self.hist.items()) / CENTI

    def max_units(self, unit_gpus: float) -> int:
        """How many units of this size would fit now (without placing them)."""
        need = to_centi(unit_gpus)
        if need == 0:
            return 1 << 30
        return sum((f // need) * c for f, c in self.hist.items())

    def place(self, unit_gpus: float, n: int) -> int:
        """Places up to ``n`` units of ``unit_gpus`` each, best fit first; returns how many it placed."""
        if n <= 0:
            return 0
        need = to_centi(unit_gpus)
        if need == 0:
            return n
        remaining = n
        for f in sorted(k for k in self.hist if k >= need):
            if remaining == 0:
                break
            count = self.hist.get(f, 0)
            if count == 0:
                continue
            per_node = f // need
            nodes = min(count, -(-remaining // per_node))
            placed = min(remaining, nodes * per_node)
            # All but the last node take `per_node` units; the last takes the rest.
            last_units = placed - (nodes - 1) * per_node
            self._move(f, f - per_node * need, nodes - 1)
            self._move(f, f - last_units * need, 1)
            remaining -= placed
        return n - remaining

    def _move(self, old: int, new: int, k: int) -> None:
        if k <= 0 or old == new:
            return
        left = self.hist[old] - k
        if left:
            self.hist[old] = left
        else:
            del self.hist[old]
        if new > 0:
            self.hist[new] = self.hist.get(new, 0) + k

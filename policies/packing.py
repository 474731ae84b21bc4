"""Per-node packing of units onto the nodes of one GPU type.

A grant counts units per GPU type, but a unit needs all its GPUs on one node: two 4-GPU workers do not
fit on two nodes with 3 free GPUs each, although 6 GPUs are free. ``TypePacker`` keeps each node's free
capacity (in centi-GPUs, so fractional replicas pack exactly) and an index from free capacity to nodes,
and places units best-fit: the fullest node that still fits goes first, which keeps large holes for
large workers. Placing or releasing touches only the nodes involved, so a decision on 100,000 GPUs
stays cheap.

Example: nodes of 8, 8 and 4 GPUs; place three 3-GPU units: best fit puts one on the 4-GPU node
(1 left) and two on an 8-GPU node (2 left); the free capacities are then 1, 2 and 8.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Iterable
from itertools import islice

CENTI = 100  # packing resolution: 1/100 GPU (Serve replicas use fractions such as 0.25 or 0.5)

_centi_of: dict[float, int] = {}


def to_centi(gpus: float) -> int:
    """GPUs to integer centi-GPUs, rounding a unit's need up so that packing never over-commits."""
    c = _centi_of.get(gpus)
    if c is None:
        c = _centi_of[gpus] = max(0, math.ceil(gpus * CENTI - 1e-6))
    return c


# Empty packers by the identity of their tuple of node sizes (the tuple is kept, so its id stays unique).
_TEMPLATES: dict[int, tuple[tuple[float, ...], TypePacker]] = {}
_MAX_TEMPLATES = 64


class TypePacker:
    """Free capacity of one GPU type's healthy nodes; places and releases units on nodes."""

    __slots__ = ("free", "buckets", "keys", "total")

    def __init__(self, node_gpus: Iterable[float] = ()) -> None:
        self.free: list[int] = [max(0, math.floor(g * CENTI + 1e-6)) for g in node_gpus]
        # free capacity -> nodes with exactly that much free (dicts as ordered sets: deterministic);
        # ``keys``: the capacities in ``buckets``, ascending; ``total``: all free centi-GPUs.
        self.buckets: dict[int, dict[int, None]] = {}
        for i, f in enumerate(self.free):
            if f > 0:
                self.buckets.setdefault(f, {})[i] = None
        self.keys: list[int] = sorted(self.buckets)
        self.total: int = sum(self.free)

    @staticmethod
    def of_nodes(node_gpus: tuple[float, ...]) -> TypePacker:
        """``TypePacker(node_gpus)``, from a template built once per tuple (a decision packs every type
        afresh, and the nodes rarely change between decisions)."""
        hit = _TEMPLATES.get(id(node_gpus))
        if hit is None or hit[0] is not node_gpus:
            if len(_TEMPLATES) >= _MAX_TEMPLATES:
                _TEMPLATES.clear()
            hit = _TEMPLATES[id(node_gpus)] = (node_gpus, TypePacker(node_gpus))
        return hit[1].copy()

    def copy(self) -> TypePacker:
        p = TypePacker()
        p.free = list(self.free)
        p.buckets = {f: dict(nodes) for f, nodes in self.buckets.items()}
        p.keys = list(self.keys)
        p.total = self.total
        return p

    @property
    def free_gpus(self) -> float:
        return self.total / CENTI

    @property
    def hist(self) -> dict[int, int]:
        """Free centi-GPUs -> number of nodes with that much free."""
        return {f: len(nodes) for f, nodes in self.buckets.items()}

    def max_units(self, unit_gpus: float) -> int:
        """How many units of this size would fit now (without placing them)."""
        need = to_centi(unit_gpus)
        if need == 0:
            return 1 << 30
        keys = self.keys
        buckets = self.buckets
        return sum((f // need) * len(buckets[f]) for f in keys[bisect_left(keys, need):])

    def place(self, unit_gpus: float, n: int) -> int:
        """Places up to ``n`` units of ``unit_gpus`` each, best fit first; returns how many it placed."""
        return self.place_into(unit_gpus, n, {})

    def place_on_nodes(self, unit_gpus: float, n: int) -> list[tuple[int, int]]:
        """Like ``place``, returning ``(node index, units)`` for every node that took units."""
        where: dict[int, int] = {}
        self.place_into(unit_gpus, n, where)
        return list(where.items())

    def place_into(self, unit_gpus: float, n: int, where: dict[int, int]) -> int:
        """Like ``place``, adding the units each node took to ``where`` (node index -> units)."""
        if n <= 0:
            return 0
        need = to_centi(unit_gpus)
        if need == 0:
            where[-1] = where.get(-1, 0) + n
            return n
        if need > self.total:
            return 0
        remaining = n
        keys, buckets, free = self.keys, self.buckets, self.free
        # A node that takes units either drops below ``need`` or ends the loop, so no node moves to a
        # capacity still ahead: walking a copy of the keys sees every candidate once.
        for f in keys[bisect_left(keys, need):]:
            per_node = f // need
            bucket = buckets[f]
            # Only the nodes this placement can use (a bucket may hold thousands of nodes).
            for i in list(islice(bucket, -(-remaining // per_node))):
                k = per_node if per_node < remaining else remaining
                new = f - k * need
                del bucket[i]
                if new > 0:
                    to = buckets.get(new)
                    if to is None:
                        buckets[new] = {i: None}
                        insort(keys, new)
                    else:
                        to[i] = None
                free[i] = new
                where[i] = where.get(i, 0) + k
                remaining -= k
                if remaining == 0:
                    break
            if not bucket:
                del buckets[f]
                del keys[bisect_left(keys, f)]
            if remaining == 0:
                break
        placed = n - remaining
        self.total -= placed * need
        return placed

    def release(self, node: int, centi: int) -> None:
        """Gives ``centi`` centi-GPUs back to ``node``."""
        if node >= 0:
            self._set(node, self.free[node] + centi)

    def _set(self, i: int, new: int) -> None:
        old = self.free[i]
        if old == new:
            return
        buckets = self.buckets
        if old > 0:
            b = buckets[old]
            del b[i]
            if not b:
                del buckets[old]
                keys = self.keys
                del keys[bisect_left(keys, old)]
        if new > 0:
            b = buckets.get(new)
            if b is None:
                buckets[new] = {i: None}
                insort(self.keys, new)
            else:
                b[i] = None
        self.free[i] = new
        self.total += new - old


class UniformPacker:
    """``TypePacker``'s figures when every unit needs the same ``need`` centi-GPUs and every node's
    capacity is a whole multiple of it (1-GPU workers and replicas on 4- and 8-GPU nodes).

    Then every node's free capacity stays a multiple of ``need`` whatever is placed or released, so any
    free ``need`` on any node takes a unit: ``place`` places ``min(n, total // need)``, exactly what
    ``TypePacker``'s best fit places, and which node a unit sits on changes no later count. Only the total
    is kept. ``uniform_packer`` says when this holds.

    Example: nodes of 8 and 4 GPUs, 1-GPU units: 12 fit; place 5, release 2 -> 9 fit.
    """

    __slots__ = ("total", "need")

    def __init__(self, total: int, need: int) -> None:
        self.total = total
        self.need = need

    def copy(self) -> UniformPacker:
        return UniformPacker(self.total, self.need)

    @property
    def free_gpus(self) -> float:
        return self.total / CENTI

    def max_units(self, unit_gpus: float) -> int:
        return self.total // self._need(unit_gpus)

    def place_into(self, unit_gpus: float, n: int, where: dict[int, int] | None = None) -> int:
        """Places up to ``n`` units; ``where`` is left alone (nodes are not told apart)."""
        if n <= 0:
            return 0
        need = self._need(unit_gpus)
        k = self.total // need
        if k > n:
            k = n
        self.total -= k * need
        return k

    def place(self, unit_gpus: float, n: int) -> int:
        return self.place_into(unit_gpus, n)

    def release(self, node: int, centi: int) -> None:
        self.total += centi

    def _need(self, unit_gpus: float) -> int:
        need = to_centi(unit_gpus)
        if need != self.need:
            raise ValueError(f"a UniformPacker of {self.need} centi-GPU units was asked to place {need}")
        return need


# (id of a tuple of node sizes, unit in centi-GPUs) -> (the tuple, its total if every node is a multiple
# of the unit, else None).
_UNIFORM: dict[tuple[int, int], tuple[tuple[float, ...], int | None]] = {}


def uniform_packer(node_gpus: tuple[float, ...], need: int) -> UniformPacker | None:
    """An empty ``UniformPacker`` of these nodes for units of ``need`` centi-GPUs, or None when a node's
    capacity is not a multiple of ``need`` (then only ``TypePacker`` counts right)."""
    if need <= 0:
        return None
    key = (id(node_gpus), need)
    hit = _UNIFORM.get(key)
    if hit is None or hit[0] is not node_gpus:
        centi = [max(0, math.floor(g * CENTI + 1e-6)) for g in node_gpus]
        total = sum(centi) if all(c % need == 0 for c in centi) else None
        if len(_UNIFORM) >= _MAX_TEMPLATES:
            _UNIFORM.clear()
        hit = _UNIFORM[key] = (node_gpus, total)
    return None if hit[1] is None else UniformPacker(hit[1], need)

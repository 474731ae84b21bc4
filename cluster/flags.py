"""Argument types for the numeric flags of the ``tidal`` CLI, so that a bad value stops the command at once.

argparse calls a flag's ``type`` with the string given and reports an ``ArgumentTypeError`` as
``argument --tick-interval: -1 is not valid: expected seconds > 0 and <= 60``, which names the flag, the
value and what is valid. Python's ``float`` alone takes ``nan``, ``inf`` and negatives, and a loop that
sleeps ``-1`` s between ticks spins. Pure: argparse and math only.

Example::

    p.add_argument("--tick-interval", type=finite_float(gt=0, le=60, unit="seconds"))
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _bounds(gt: float | None, ge: float | None, le: float | None) -> str:
    parts = []
    if gt is not None:
        parts.append(f"> {gt:g}")
    if ge is not None:
        parts.append(f">= {ge:g}")
    if le is not None:
        parts.append(f"<= {le:g}")
    return " and ".join(parts)


def finite_float(
    *, gt: float | None = None, ge: float | None = None, le: float | None = None, unit: str = "a number"
) -> Callable[[str], float]:
    """A ``type=`` for a float flag: finite, within the bounds given.

    Example: ``finite_float(gt=0, unit="seconds")("nan")`` raises ``ArgumentTypeError("'nan' is not valid:
    expected seconds > 0 (a finite number)")``.
    """
    valid = f"{unit} {_bounds(gt, ge, le)}".strip()

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = (
            math.isfinite(value)
            and (gt is None or value > gt)
            and (ge is None or value >= ge)
            and (le is None or value <= le)
        )
        if not ok:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid: expected {valid} (a finite number)")
        return value

    parse.__name__ = "finite_float"  # argparse names the type in some messages
    return parse


def bounded_int(*, ge: int | None = None, le: int | None = None, unit: str = "a whole number") -> Callable[[str], int]:
    """A ``type=`` for an integer flag within the bounds given, e.g. ``bounded_int(ge=1)`` for a count."""
    valid = f"{unit} {_bounds(None, ge, le)}".strip()

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or (ge is not None and value < ge) or (le is not None and value > le):
            raise argparse.ArgumentTypeError(f"{text!r} is not valid: expected {valid}")
        return value

    parse.__name__ = "bounded_int"
    return parse


def port(text: str) -> int:
    """A ``type=`` for a TCP port flag: 0 to 65535 (0: none, or any free port, as the flag's help says)."""
    return bounded_int(ge=0, le=65535, unit="a port")(text)

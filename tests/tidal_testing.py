"""Helpers for tests, in a plain module: ``from tidal_testing import wait_for``.

Not in a conftest: every ``conftest.py`` is imported as the module ``conftest``, so a second one (in a
sub-directory) shadows the first, and ``from conftest import ...`` then depends on collection order.
tests/ is on ``sys.path`` in every test session (pytest puts it there for tests/conftest.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout_s: float,
    interval_s: float = 0.2,
    message: str = "condition",
) -> T:
    """Polls ``predicate`` until it returns a truthy value, and returns that value.

    Exceptions raised by the predicate count as "not yet" (a service still starting refuses connections),
    and the last one is reported if time runs out.

    Raises:
        TimeoutError: naming ``message``, the last value and the last exception.
    """
    deadline = time.monotonic() + timeout_s
    last_value: Any = None
    last_error: BaseException | None = None
    while True:
        try:
            last_value = predicate()
            if last_value:
                return last_value
        except Exception as e:  # noqa: BLE001 - reported below if it never clears
            last_error = e
        if time.monotonic() >= deadline:
            detail = f"; last value {last_value!r}" + (f"; last error {last_error!r}" if last_error else "")
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {message}{detail}")
        time.sleep(interval_s)

"""Helpers for tests, in a plain module: ``from tidal_testing import wait_for``.

Not in a conftest: every ``conftest.py`` is imported as the module ``conftest``, so a second one (in a
sub-directory) shadows the first, and ``from conftest import ...`` then depends on collection order.
tests/ is on ``sys.path`` in every test session (pytest puts it there for tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def arbiter_policy(ray_driver: Any, config: dict[str, Any]) -> Iterator[Any]:
    """The session cluster's arbiter (``tidal-arbiter``, started if needed) with ``config`` for the block, its
    old config put back after; yields its handle. For a module-scoped fixture that needs its own policy."""
    from tidal.cluster.actor import get_or_create_arbiter

    handle = get_or_create_arbiter(config=config)
    old = ray_driver.get(handle.config.remote())
    ray_driver.get(handle.reload_config.remote(config))
    try:
        yield handle
    finally:
        ray_driver.get(handle.reload_config.remote(old))


def serve_apps_to_keep(details: Any, *replaced: str) -> tuple[bool, list[dict[str, Any]]]:
    """From Serve's details before a test's ``serve deploy`` (which replaces every application of the config):
    whether Serve was running, and the config of every other module's application, to deploy along."""
    running = details.controller_info.node_id is not None or bool(details.applications)
    others = [
        a.deployed_app_config.model_dump(exclude_unset=True)
        for n, a in details.applications.items()
        if a.deployed_app_config is not None and n not in replaced
    ]
    return running, others

"""Where the arbiter's actor keeps what it must not forget, and what it does when that no longer parses.

Pure: a ``StateStore`` is a small key-value interface (the actor's is Ray's internal KV, in
``tidal.cluster.actor``; tests use ``MemoryStore``). Two rules live here:

- A saved value that no longer parses (an upgrade changed the format, a bug wrote garbage) is *set aside*:
  moved to ``<key>.bad-<unix seconds>``, with an error log naming the key, the problem and the new key, and
  the caller starts clean. An actor that raised in its constructor instead would raise again on every restart.
- ``reset_saved_state`` clears one arbiter's saved state and config (and their set-aside copies) with no
  actor at all: what ``tidal arbiter reset`` runs while the actor is dead or wedged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StateStore(Protocol):
    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> None: ...

    def keys(self, prefix: bytes) -> list[bytes]: ...


class MemoryStore:
    """A ``StateStore`` in a dict (``store.data``)."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self.data[key] = value

    def delete(self, key: bytes) -> None:
        self.data.pop(key, None)

    def keys(self, prefix: bytes) -> list[bytes]:
        return [k for k in self.data if k.startswith(prefix)]


def _prefix(name: str) -> bytes:
    return f"arbiter/{name}/".encode()


def state_keys(name: str) -> dict[str, bytes]:
    """The keys of the arbiter ``name``: its state (``dump_state()``) and its policy config."""
    return {"state": _prefix(name) + b"state", "config": _prefix(name) + b"config"}


def set_aside(store: StateStore, key: bytes, raw: bytes, problem: str, now_s: float) -> bytes:
    """Moves ``raw`` from ``key`` to a new ``<key>.bad-<now_s>`` key, logs why, and returns the new key."""
    base = key + b".bad-" + str(int(now_s)).encode()
    aside, n = base, 1
    while store.get(aside) is not None:
        n += 1
        aside = base + b"-" + str(n).encode()
    store.put(aside, raw)
    store.delete(key)
    logger.error(
        "the saved %s no longer parses and is set aside as %s: %s. Starting without it; "
        "`tidal arbiter reset` deletes it and its copies.",
        key.decode(errors="replace"), aside.decode(errors="replace"), problem,
    )  # fmt: skip
    return aside


def load_or_set_aside(
    store: StateStore, key: bytes, parse: Callable[[bytes], T], what: str, now_s: float
) -> T | None:
    """``parse`` of the value at ``key``; None when there is none, or when ``parse`` raises (then the value
    is set aside, see the module docstring, with ``what`` and the error in the log)."""
    raw = store.get(key)
    if raw is None:
        return None
    try:
        return parse(raw)
    except Exception as e:  # anything the parser raises: the value cannot be used, whatever the reason
        set_aside(store, key, raw, f"{what}: {type(e).__name__}: {e}", now_s)
        return None


def reset_saved_state(store: StateStore, name: str) -> list[bytes]:
    """Deletes the saved state and config of the arbiter ``name`` and their set-aside copies; returns the keys."""
    keys = sorted(store.keys(_prefix(name)))
    for k in keys:
        store.delete(k)
    return keys

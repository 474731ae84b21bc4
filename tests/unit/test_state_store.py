"""The arbiter's saved state and config: set aside when they no longer parse, and reset without an actor."""

import json
import logging

from tidal.cluster.state_store import MemoryStore, load_or_set_aside, reset_saved_state, state_keys


def _parse_json_dict(raw: bytes) -> dict:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError(f"not an object: {type(data).__name__}")
    return data


def test_saved_state_that_no_longer_parses_is_set_aside_with_a_loud_log_and_nothing_is_raised(caplog):
    store = MemoryStore()
    key = state_keys("tidal-arbiter")["state"]
    store.put(key, b"{not json")
    with caplog.at_level(logging.ERROR):
        loaded = load_or_set_aside(store, key, _parse_json_dict, "arbiter state", now_s=1234.5)
    assert loaded is None
    assert store.get(key) is None
    aside = [k for k in store.data if k != key]
    assert len(aside) == 1 and store.get(aside[0]) == b"{not json"
    assert aside[0].startswith(key + b".bad-")
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "arbiter state" in message and aside[0].decode() in message and "Expecting property name" in message


def test_saved_state_that_parses_is_returned_and_left_in_place():
    store = MemoryStore()
    key = state_keys("tidal-arbiter")["config"]
    store.put(key, b'{"policy": "tidal"}')
    assert load_or_set_aside(store, key, _parse_json_dict, "arbiter config", now_s=0.0) == {"policy": "tidal"}
    assert list(store.data) == [key]


def test_reset_clears_the_saved_state_and_config_of_one_arbiter_only():
    store = MemoryStore()
    mine, other = state_keys("tidal-arbiter"), state_keys("tidal-arbiter-2")
    for k in (*mine.values(), *other.values()):
        store.put(k, b"x")
    store.put(mine["state"] + b".bad-1", b"x")
    removed = reset_saved_state(store, "tidal-arbiter")
    assert set(removed) == {*mine.values(), mine["state"] + b".bad-1"}
    assert all(store.get(k) is None for k in removed)
    assert all(store.get(k) == b"x" for k in other.values())

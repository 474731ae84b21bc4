"""``tidal.cluster.connect``: the record ``tidal up`` leaves in TIDAL_HOME, and the cluster a command talks to."""

import json

import pytest
from tidal.cluster.connect import POINTER_FILE, connect, forget_recorded, record_cluster, recorded_cluster


def test_a_record_points_at_the_state_file_and_is_forgotten(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDAL_HOME", str(tmp_path / "home"))
    record_cluster(tmp_path / "state.json")
    pointer = tmp_path / "home" / POINTER_FILE
    assert json.loads(pointer.read_text()) == {"state_path": str(tmp_path / "state.json")}
    forget_recorded()
    assert not pointer.exists() and recorded_cluster() is None


def test_an_unreadable_record_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TIDAL_HOME", str(tmp_path))
    (tmp_path / POINTER_FILE).write_text("{not json")
    assert recorded_cluster() is None
    assert "ignoring an unreadable record" in caplog.text


def test_with_no_record_no_address_and_no_ray_address_connect_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDAL_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RuntimeError, match=r"run `tidal up`, or pass --address"):
        connect(None)

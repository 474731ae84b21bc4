"""tidal.training.loop: checkpoint staging folders left by a worker killed mid-checkpoint are swept by the next."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from tidal.training.loop import STAGING_PREFIX, staging_prefix, sweep_orphaned_staging


def test_a_folder_whose_writer_is_gone_is_removed_and_every_other_is_kept(tmp_path: Path):
    dead, live = 4_000_001, 4_000_002
    orphan = tmp_path / f"{STAGING_PREFIX}{dead}-k2x9_q1a"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "sub" / "state.pt").write_bytes(b"x" * 10)
    writing = tmp_path / f"{STAGING_PREFIX}{live}-abcd1234"  # its writer still runs
    writing.mkdir()
    old_style = tmp_path / f"{STAGING_PREFIX}2k2435xt"  # no pid in the name: whose it is, nobody knows
    old_style.mkdir()
    other = tmp_path / f"not-{STAGING_PREFIX}{dead}-abcd1234"
    other.mkdir()
    a_file = tmp_path / f"{STAGING_PREFIX}{dead}-efgh5678"
    a_file.write_text("not a folder")
    recent = tmp_path / f"{STAGING_PREFIX}{dead}-recent12"  # touched a minute ago: maybe still being written
    recent.mkdir()
    hour_ago = time.time() - 3600
    for p in (orphan, writing, old_style, other, a_file):
        os.utime(p, (hour_ago, hour_ago))
    os.utime(recent, (time.time() - 60, time.time() - 60))

    removed = sweep_orphaned_staging(tmp_path, alive=lambda pid: pid == live)

    assert removed == [orphan] and not orphan.exists()
    assert writing.is_dir() and old_style.is_dir() and other.is_dir() and a_file.is_file() and recent.is_dir()


def test_a_staging_folder_names_this_process_and_is_kept_while_it_runs(tmp_path: Path):
    assert staging_prefix() == f"{STAGING_PREFIX}{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=staging_prefix(), dir=tmp_path) as staged:
        assert sweep_orphaned_staging(tmp_path, min_age_s=0) == []  # the real pid check: this process is alive
        assert Path(staged).is_dir()
    # The same name with a pid no process can have (above Linux's largest pid_max) is swept by the real check.
    gone = tmp_path / f"{staging_prefix(2**22 + 12345)}zz99"
    gone.mkdir()
    assert sweep_orphaned_staging(tmp_path, min_age_s=0) == [gone]


def test_a_temp_dir_that_cannot_be_read_removes_nothing(tmp_path: Path):
    assert sweep_orphaned_staging(tmp_path / "missing") == []

"""Port leases: ranges that never overlap between clusters, and stale leases taken over."""

from __future__ import annotations

import json

import tidal.cluster.port_lease as port_lease
from tidal.cluster.port_lease import PortLease


def test_port_leases_do_not_overlap_and_stale_leases_are_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(port_lease, "LEASE_DIR", tmp_path)
    leases = [PortLease.acquire(300, owner="t") for _ in range(5)]
    ranges = sorted((lease.start, lease.end) for lease in leases)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ranges, ranges[1:], strict=False))
    assert all(port_lease.PORT_POOL_START <= s and e <= port_lease.PORT_POOL_END for s, e in ranges)
    # A lease whose processes are gone, and past its start-up grace, no longer blocks its range.
    info = json.loads(leases[0].path.read_text())
    info.update(pids=[2**22 + 12345], created_s=0.0)
    leases[0].path.write_text(json.dumps(info))
    PortLease.acquire(10, owner="t")
    assert not leases[0].path.exists()
    ports = [leases[1].take() for _ in range(3)]
    assert ports == [leases[1].start, leases[1].start + 1, leases[1].start + 2]


def test_a_lease_held_by_a_live_process_is_not_taken_over_even_past_its_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(port_lease, "LEASE_DIR", tmp_path)
    lease = PortLease.acquire(300, owner="t")
    info = json.loads(lease.path.read_text())
    info["created_s"] = 0.0  # long past the grace; its pid (this process) still runs
    lease.path.write_text(json.dumps(info))
    PortLease.acquire(10, owner="t")
    assert lease.path.exists()

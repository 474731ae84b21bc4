"""The arbiter actor on the session's real local Ray cluster: grants, faults, expiry, metrics, reload.

These tests use their own arbiter actor (a distinct name and namespace), so that other modules' tests,
which use the default "tidal-arbiter", never see its short TTL or its kills. The node they kill is one they
add (a T4 node beyond the spec), so the spec's nodes stay up for everyone else.
"""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tidal.cluster.actor import get_or_create_arbiter, kill_arbiter
from tidal.cluster.client import ArbiterClient
from tidal.cluster.model import Allocation, ServiceSpec, TrainingJobSpec
from tidal_testing import wait_for

pytestmark = pytest.mark.integration

NAME, NAMESPACE = "tidal-arbiter-rt", "tidal-rt-test"


def _config(ttl_s: float = 15.0) -> dict:
    return {
        "policy": "tidal",
        # No hysteresis or batching: these tests look at one move at a time.
        "guards": {"service_downscale_delay_s": 0, "job_resize_min_interval_s": 0},
        "arbiter": {"tick_interval_s": 0.5, "registration_ttl_s": ttl_s},
    }


@pytest.fixture(scope="module")
def arbiter(ray_driver, local_cluster):
    ray = ray_driver
    handle = get_or_create_arbiter(
        config=_config(), name=NAME, namespace=NAMESPACE, metrics_port=local_cluster.spare_ports[0]
    )
    client = ArbiterClient(NAME, NAMESPACE)
    try:
        yield ray, handle, client
    finally:
        kill_arbiter(NAME, NAMESPACE)


def _status(ray, handle) -> dict:
    return ray.get(handle.status.remote(), timeout=10)


def _granted_and_held(client: ArbiterClient, name: str, gpu_type: str, units: int):
    """Heartbeats as a cooperative workload: reports holding whatever it was granted."""
    view = client.heartbeat(name)
    view = client.heartbeat(name, held=view.grant.as_dict())
    return view if view.grant.get(gpu_type) == units else None


def test_killed_node_leaves_the_inventory_and_the_arbiter_takes_its_grants_back(arbiter, local_cluster):
    ray, handle, client = arbiter
    local_cluster.add_node("t4-0", gpu_type="T4", num_gpus=2, num_cpus=1)
    wait_for(lambda: _status(ray, handle)["capacity"].get("T4") == 2.0, 20, message="the T4 node in the inventory")
    job = TrainingJobSpec("rt-job-t4", 1.0, 1, 2, ("T4",), yield_grace_s=600)
    try:
        client.register(job)
        wait_for(lambda: _granted_and_held(client, job.name, "T4", 2), 20, message="2 T4 granted to the job")
        local_cluster.kill_node("t4-0")
        wait_for(lambda: not local_cluster.node_table()["t4-0"]["alive"], 30, message="the GCS to mark t4-0 dead")
        wait_for(lambda: "T4" not in _status(ray, handle)["capacity"], 20, message="T4 gone from the inventory")
        # The job still claims to hold its T4s (it cannot know yet); its grant goes anyway.
        view = wait_for(
            lambda: (v := client.heartbeat(job.name, held={"T4": 2})) and not v.grant and v,
            20, message="the job's T4 grant taken back",
        )
        assert view.registered
        assert "T4" not in _status(ray, handle)["granted"]
    finally:
        client.unregister(job.name)


def test_killed_arbiter_actor_comes_back_with_its_registrations_and_grants(arbiter):
    ray, handle, client = arbiter
    svc = ServiceSpec("rt-svc-a100", 1.0, 1, 2, ("A100",))
    try:
        client.register(svc)
        wait_for(lambda: _granted_and_held(client, svc.name, "A100", 2), 20, message="2 A100 granted to the service")
        before = ray.get(handle.dump_state.remote(), timeout=10)
        pid_before = ray.get(handle.ping.remote(), timeout=10)["pid"]
        ray.kill(handle, no_restart=False)  # as a crash would: Ray restarts it
        info = wait_for(
            lambda: (p := ray.get(handle.ping.remote(), timeout=5))["pid"] != pid_before and p,
            60, message="the arbiter actor to restart",
        )
        assert info["reconstructed"] is True
        assert info["restored"] >= 1
        after = ray.get(handle.dump_state.remote(), timeout=10)
        assert after["grants"][svc.name] == before["grants"][svc.name] == {"A100": 2}
        view = client.heartbeat(svc.name, held={"A100": 2})
        assert view.registered and view.grant == Allocation.of(A100=2)
    finally:
        client.unregister(svc.name)


def test_workload_that_stops_heartbeating_loses_its_grant_after_its_ttl(arbiter):
    ray, handle, client = arbiter
    ray.get(handle.reload_config.remote(_config(ttl_s=2.0)), timeout=10)
    job = TrainingJobSpec("rt-job-silent", 1.0, 1, 2, ("RTX4090",))
    try:
        client.register(job)
        wait_for(lambda: _granted_and_held(client, job.name, "RTX4090", 2), 20, message="2 RTX4090 granted")
        # Silence: no more heartbeats.
        wait_for(
            lambda: all(w["name"] != job.name for w in _status(ray, handle)["workloads"]),
            30, message="the silent job to expire",
        )
        events = ray.get(handle.events.remote(), timeout=10)
        assert any(e["kind"] == "expired" and e["workload"] == job.name for e in events)
        assert "RTX4090" not in _status(ray, handle)["granted"]
        view = client.heartbeat(job.name)  # the client re-registers a workload the arbiter forgot
        assert view.registered
    finally:
        client.unregister(job.name)
        ray.get(handle.reload_config.remote(_config()), timeout=10)


def test_released_gpus_reach_the_waiting_service_only_after_the_job_lets_them_go(arbiter):
    ray, handle, client = arbiter
    job = TrainingJobSpec("rt-job-h100", 1.0, 1, 4, ("H100",), yield_grace_s=600)
    svc = ServiceSpec("rt-svc-h100", 1.0, 1, 2, ("H100",))
    try:
        client.register(job)
        wait_for(lambda: _granted_and_held(client, job.name, "H100", 4), 20, message="4 H100 granted to the job")
        client.register(svc)
        # The job's grant shrinks; it still holds 4, so the service gets nothing yet (release before grant).
        shrunk = wait_for(
            lambda: (v := client.heartbeat(job.name, held={"H100": 4})).grant.get("H100") < 4 and v,
            20, message="the job's grant to shrink",
        )
        assert shrunk.release_by_s is not None
        assert client.heartbeat(svc.name).grant.get("H100") == 0
        # The job lets the GPUs go; the service gets them.
        client.heartbeat(job.name, held=shrunk.grant.as_dict())
        view = wait_for(
            lambda: (v := client.heartbeat(svc.name)).grant.get("H100") == 2 and v,
            20, message="the released H100s to reach the service",
        )
        assert view.registered
    finally:
        client.unregister(svc.name)
        client.unregister(job.name)


def test_a_held_grant_watch_returns_the_shrink_the_tick_decides_and_an_unchanged_grant_at_its_timeout(arbiter):
    ray, handle, client = arbiter
    job = TrainingJobSpec("rt-job-watch", 1.0, 1, 4, ("H100",), yield_grace_s=600)
    svc = ServiceSpec("rt-svc-watch", 1.0, 1, 2, ("H100",))
    try:
        client.register(job)
        full = wait_for(lambda: _granted_and_held(client, job.name, "H100", 4), 20, message="4 H100 to the job")
        # Nothing changes: the watch comes back with the same grant once its (short) timeout is over.
        assert client.watch_grant(job.name, full.grant.as_dict(), timeout_s=0.5).grant == full.grant
        # A watch held for up to 60 s, then a service that needs 1 H100 back from the job.
        watch = handle.watch_grant.remote(job.name, full.grant.as_dict(), 60.0)
        client.register(svc)
        view = ray.get(watch, timeout=30)
        assert view.grant.get("H100") < 4 and view.release_by_s is not None
    finally:
        client.unregister(svc.name)
        client.unregister(job.name)


@pytest.mark.parametrize("how", ["kill the named actor", "call its stop method"])
def test_job_that_keeps_gpus_past_its_grace_is_stopped_by_force(arbiter, how):
    ray, handle, client = arbiter

    @ray.remote(num_cpus=0)
    class Victim:
        def __init__(self) -> None:
            self.stopped = 0

        def ping(self) -> str:
            return "alive"

        def force_stop(self) -> bool:  # a TidalTrainer run's signal actor has this method
            self.stopped += 1
            return True

        def times_stopped(self) -> int:
            return self.stopped

    tag = "kill" if how.startswith("kill") else "method"
    victim = Victim.options(name=f"rt-victim-{tag}", namespace=NAMESPACE, lifetime="detached").remote()
    assert ray.get(victim.ping.remote(), timeout=30) == "alive"
    if tag == "kill":
        meta = {"actor_name": f"rt-victim-{tag}", "actor_namespace": NAMESPACE}
    else:  # what TidalTrainer registers; a submission_id next to it must not be used
        meta = {
            "stop_actor": f"rt-victim-{tag}", "stop_actor_namespace": NAMESPACE, "stop_method": "force_stop",
            "submission_id": "not-a-ray-job",
        }  # fmt: skip
    job = TrainingJobSpec(f"rt-job-stubborn-{tag}", 1.0, 1, 4, ("H100",), yield_grace_s=1.0)
    svc = ServiceSpec(f"rt-svc-forced-{tag}", 1.0, 1, 2, ("H100",))
    try:
        client.register(job, meta=meta)
        wait_for(lambda: _granted_and_held(client, job.name, "H100", 4), 20, message="4 H100 granted to the job")
        client.register(svc)
        # The job never lets go: after its grace the arbiter stops it by force ...
        wait_for(
            lambda: any(e["kind"] == "forced" and e["workload"] == job.name for e in ray.get(handle.events.remote())),
            30,
            message="the forced stop",
        )
        if tag == "kill":
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(victim.ping.remote(), timeout=30)
        else:
            wait_for(lambda: ray.get(victim.times_stopped.remote(), timeout=10) >= 1, 20, message="force_stop called")
            assert ray.get(victim.ping.remote(), timeout=30) == "alive"  # stopped what it holds, not killed
        # ... and its GPUs stay its own until its report confirms the stop; then the service gets them.
        assert client.heartbeat(svc.name).grant.get("H100") == 0
        client.heartbeat(job.name, held={"H100": 2})
        wait_for(lambda: client.heartbeat(svc.name).grant.get("H100") == 2, 10, message="the confirmed release")
        events = ray.get(handle.events.remote(), timeout=10)
        assert any(e["kind"] == "force_confirmed" and e["workload"] == job.name for e in events)
    finally:
        client.unregister(svc.name)
        client.unregister(job.name)
        if tag == "method":
            ray.kill(victim, no_restart=True)


def test_heartbeat_nowait_returns_none_first_then_the_grant_without_blocking(arbiter):
    ray, handle, client = arbiter
    svc = ServiceSpec("rt-svc-nowait", 1.0, 1, 1, ("RTX4090",))
    client.register(svc)
    fresh = ArbiterClient(NAME, NAMESPACE)
    try:
        assert fresh.heartbeat_nowait(svc.name, demand_units=1) is None
        view = wait_for(
            lambda: (v := fresh.heartbeat_nowait(svc.name, demand_units=1, held={"RTX4090": 1})) and v.grant and v,
            20, message="a grant through heartbeat_nowait",
        )
        assert view.grant == Allocation.of(RTX4090=1)
    finally:
        client.unregister(svc.name)


def test_metrics_are_scraped_over_http_with_inventory_and_grants(arbiter, local_cluster):
    ray, handle, client = arbiter
    svc = ServiceSpec("rt-svc-metrics", 1.0, 1, 1, ("A100",))
    client.register(svc)
    try:
        wait_for(lambda: _granted_and_held(client, svc.name, "A100", 1), 20, message="1 A100 granted")
        url = f"http://127.0.0.1:{local_cluster.spare_ports[0]}/metrics"

        def scrape() -> dict:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            return {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text)
                for s in fam.samples
            }

        samples = wait_for(
            lambda: (m := scrape()).get(
                ("tidal_grant_units", (("gpu_type", "A100"), ("kind", "service"), ("workload", svc.name)))
            ) == 1.0 and m,
            20, message="the service's grant in the metrics",
        )
        assert samples[("tidal_gpus", (("gpu_type", "H100"), ("state", "total")))] == 4.0
        assert samples[("tidal_gpus", (("gpu_type", "A100"), ("state", "total")))] == 2.0
        assert samples[("tidal_allocation_ratio", ())] > 0
        assert samples[("tidal_decision_seconds_count", ())] > 0
        assert ("tidal_cost_per_hour_dollars", (("kind", "service"), ("workload", svc.name))) in samples
    finally:
        client.unregister(svc.name)


def test_bad_config_is_refused_and_the_running_config_stays(arbiter):
    ray, handle, client = arbiter
    before = ray.get(handle.config.remote(), timeout=10)
    with pytest.raises(ray.exceptions.RayTaskError, match="unknown policy 'no-such-policy'"):
        ray.get(handle.reload_config.remote({**_config(), "policy": "no-such-policy"}), timeout=10)
    with pytest.raises(ray.exceptions.RayTaskError, match="tick_interval_s"):
        ray.get(handle.reload_config.remote({"arbiter": {"tick_interval_s": -1}}), timeout=10)
    assert ray.get(handle.config.remote(), timeout=10) == before


def test_a_registration_with_a_bad_value_is_refused_naming_the_field(arbiter):
    ray, handle, client = arbiter
    bad = {"kind": "service", "name": "rt-svc-nan", "gpus_per_replica": float("nan"), "min_replicas": 1,
           "max_replicas": 2, "gpu_types": ["H100"], "slo_p99_ms": 500.0, "priority": 100}  # fmt: skip
    with pytest.raises(ray.exceptions.RayTaskError, match=r"gpus_per_replica.*nan"):
        ray.get(handle.register.remote(bad), timeout=10)
    assert not client.heartbeat("rt-svc-nan").registered
    assert ray.get(handle.tick_now.remote(), timeout=10)["now_s"] > 0


def test_saved_state_that_no_longer_parses_is_set_aside_and_reset_clears_it_without_an_actor(ray_driver):
    from tidal.cluster.actor import KvStore, get_arbiter, reset_arbiter_state
    from tidal.cluster.state_store import state_keys

    ray = ray_driver
    name = "tidal-arbiter-rt-bad-state"
    store, keys = KvStore(), state_keys(name)
    prefix = keys["state"].rsplit(b"/", 1)[0] + b"/"
    store.put(keys["state"], b'{"version": 1, "registrations": [{"spec": {"kind": "nope"}}]}')
    store.put(keys["config"], b"{not json")
    try:
        handle = get_or_create_arbiter(config=_config(), name=name, namespace=NAMESPACE)
        assert ray.get(handle.ping.remote(), timeout=10)["restored"] == 0  # up, and clean
        aside = sorted(k for k in store.keys(prefix) if b".bad-" in k)
        assert len(aside) == 2, aside
        assert store.get(keys["state"]) is not None  # its own, fresh state
        ray.kill(handle, no_restart=True)  # dead (or wedged): reset needs no actor
        removed = reset_arbiter_state(name, NAMESPACE)
        assert {k.encode() for k in removed} >= {keys["state"], keys["config"], *aside}
        assert store.keys(prefix) == [] and get_arbiter(name, NAMESPACE) is None
    finally:
        kill_arbiter(name, NAMESPACE)


def test_a_job_whose_driver_ended_expires_without_waiting_for_its_ttl(arbiter, local_cluster, tmp_path):
    # A driver that connects and exits: its Ray job is dead in the GCS's job table (what RayBackend reads
    # through Ray's internal GcsClient.get_all_job_info; this test pins that call).
    import subprocess
    import sys

    from tidal.cluster.ray_backend import _dead_ray_jobs

    ray, handle, client = arbiter
    code = "import ray; ray.init(); print(ray.get_runtime_context().get_job_id())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=local_cluster.env(), cwd=tmp_path, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    dead_job = out.stdout.strip().splitlines()[-1]
    assert dead_job in _dead_ray_jobs()
    assert ray.get_runtime_context().get_job_id() not in _dead_ray_jobs()
    spec = TrainingJobSpec("rt-dead-driver", 1.0, 1, 1, ("RTX4090",))
    client.register(spec, meta={"ray_job_id": dead_job})
    wait_for(
        lambda: spec.name not in [w["name"] for w in _status(ray, handle)["workloads"]],
        timeout_s=10,  # the TTL is 15 s, and nothing heartbeats for it
        message="the registration of a job whose driver ended expired",
    )
    events = ray.get(handle.events.remote(), timeout=10)
    assert any(
        e["kind"] == "expired" and e["workload"] == spec.name and e["detail"].get("reason") == "its Ray job ended"
        for e in events
    )

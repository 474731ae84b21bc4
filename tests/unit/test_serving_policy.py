"""The Tidal Serve autoscaling policy and its arbiter link, driven with a fake arbiter client, a fake view of
Serve's controller and a manual clock (no Ray: the policy is plain Python that Serve calls with an
AutoscalingContext)."""

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from tidal.cluster.arbiter import ManualClock
from tidal.cluster.model import EMPTY, Allocation, GrantView
from tidal.serving.autoscale import (
    GRANT_POLL_WINDOW_S,
    ArbiterLink,
    ServeTarget,
    TidalAutoscalingPolicy,
    replica_gpu_types,
)
from tidal.serving.autoscale_math import DeploymentSnapshot
from tidal.serving.config import GPU_TYPE_METRIC_PREFIX, TidalPolicyOptions


class FakeArbiterClient:
    """Answers like the arbiter: a grant per heartbeat; records every call."""

    def __init__(self, grant: Allocation = EMPTY, available: bool = True) -> None:
        self.grant = grant
        self.is_available = available
        self.registered: list[Any] = []
        self.register_demands: list[int | None] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.unregistered: list[str] = []
        self.known = True

    def available(self) -> bool:
        return self.is_available

    def register(self, spec, meta=None, *, demand_units=None, held=None):
        self.registered.append(spec)
        self.register_demands.append(demand_units)
        self.known = True
        return GrantView(spec.name, self.grant)

    def heartbeat(self, name, *, demand_units=None, held=None, progress=None, **kw):
        self.heartbeats.append({"demand_units": demand_units, "held": held, "progress": progress})
        if not self.known:
            return GrantView(name, EMPTY, registered=False, reason="expired")
        return GrantView(name, self.grant)

    def unregister(self, name):
        self.unregistered.append(name)
        self.known = False
        return True


class FakeInspector:
    """Serve's controller as the link reads it: one deployment, its GPUs per replica and replicas' nodes' types.

    ``snapshot`` None: the deployment is gone.
    """

    def __init__(self, snapshot: DeploymentSnapshot | None = None) -> None:
        self.snapshot: DeploymentSnapshot | None = snapshot or DeploymentSnapshot(1.0, ("A100", "H100"), {})
        self.calls: list[tuple[str, str]] = []

    def observe(self, app_name, deployment_name):
        self.calls.append((app_name, deployment_name))
        return self.snapshot


@dataclass(frozen=True)
class Rid:
    unique_id: str


@dataclass
class Cfg:
    """The fields of Serve's AutoscalingConfig the policy reads (the deployment's own autoscaling_config)."""

    min_replicas: int = 0
    max_replicas: int = 8
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 0.0
    downscale_delay_s: float = 1.0
    downscale_to_zero_delay_s: float | None = None


@dataclass
class Ctx:
    """The fields of Serve's AutoscalingContext the policy reads."""

    total_num_requests: float = 0.0
    current_num_replicas: int = 1
    running_replicas: list[Rid] = field(default_factory=list)
    aggregated_metrics: dict[str, dict[Rid, float]] = field(default_factory=dict)
    app_name: str = "shop"
    deployment_name: str = "Digits"
    config: Cfg = field(default_factory=Cfg)


def policy_class(client: FakeArbiterClient, clock: ManualClock, inspector: FakeInspector | None = None):
    """The policy with its seams on fakes: Serve would build it from ``policy_kwargs`` the same way."""
    inspector = inspector or FakeInspector()

    class Policy(TidalAutoscalingPolicy):
        client_factory = staticmethod(lambda name, ns: client)
        inspector_factory = staticmethod(lambda: inspector)
        run_link_thread = False

    Policy.clock = staticmethod(clock.now)
    return Policy


def make_policy(
    client: FakeArbiterClient,
    clock: ManualClock,
    upscale_delay_s: float = 0.0,
    inspector: FakeInspector | None = None,
    **kwargs,
):
    kwargs = {"name": "digits", "gpu_types": ["A100", "H100"], **kwargs}
    return policy_class(client, clock, inspector)(
        downscale_delay_s=30.0, upscale_delay_s=upscale_delay_s, **kwargs
    )


def running(*types: str | None) -> tuple[list[Rid], dict[str, dict[Rid, float]]]:
    rids = [Rid(f"r{i}") for i in range(len(types))]
    metrics: dict[str, dict[Rid, float]] = {}
    for rid, t in zip(rids, types, strict=True):
        if t is not None:
            metrics.setdefault(GPU_TYPE_METRIC_PREFIX + t, {})[rid] = 1.0
    return rids, metrics


def test_before_any_grant_the_policy_scales_on_load_within_bounds():
    clock = ManualClock(100.0)
    policy = make_policy(FakeArbiterClient(), clock)
    replicas, _ = policy(Ctx(total_num_requests=9))
    assert replicas == 5


def test_replicas_are_capped_at_the_grant_while_the_full_demand_is_reported():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=2))
    policy = make_policy(client, clock)
    policy(Ctx(total_num_requests=9))
    policy.link.step()  # registers, heartbeats demand 5, receives grant A100=2
    assert [s.name for s in client.registered] == ["digits"]
    assert client.register_demands == [5]  # registers with what the load needs, not its max
    assert client.heartbeats[-1]["demand_units"] == 5
    replicas, _ = policy(Ctx(total_num_requests=9))
    assert replicas == 2


def test_a_bigger_grant_lets_replicas_grow_and_a_smaller_one_shrinks_them_at_once():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=2))
    policy = make_policy(client, clock)
    policy(Ctx(total_num_requests=9))
    policy.link.step()
    assert policy(Ctx(total_num_requests=9))[0] == 2
    client.grant = Allocation.of(A100=2, H100=2)
    clock.advance(0.5)
    policy.link.step()
    assert policy(Ctx(total_num_requests=9))[0] == 4
    client.grant = Allocation.of(A100=1)
    clock.advance(0.5)
    policy.link.step()
    # No load hold for a grant shrink: the arbiter waits for these GPUs.
    assert policy(Ctx(total_num_requests=9))[0] == 1


def test_the_policy_reports_a_rise_and_adds_replicas_once_it_has_lasted_the_upscale_delay():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=8))
    policy = make_policy(client, clock, upscale_delay_s=0.5)
    assert policy(Ctx(total_num_requests=9))[0] == 0  # the load wants 5: wait 0.5 s
    policy.link.step()
    assert client.heartbeats[-1]["demand_units"] == 0
    clock.advance(0.5)
    assert policy(Ctx(total_num_requests=9))[0] == 5
    policy.link.step()
    assert client.heartbeats[-1]["demand_units"] == 5


def test_a_changed_demand_wakes_the_link_and_an_unchanged_one_does_not():
    clock = ManualClock(100.0)
    policy = make_policy(FakeArbiterClient(grant=Allocation.of(A100=8)), clock)
    policy(Ctx(total_num_requests=4))  # the first demand (2)
    assert policy.link._wake.is_set()
    policy.link._wake.clear()
    clock.advance(0.1)
    policy(Ctx(total_num_requests=4))  # demand 2 again: the next period is soon enough
    assert not policy.link._wake.is_set()
    clock.advance(0.1)
    policy(Ctx(total_num_requests=9))  # demand 5
    assert policy.link._wake.is_set()


def test_the_link_asks_often_while_the_demand_is_above_the_grant_and_only_for_a_while():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=4))
    policy = make_policy(client, clock)
    period, poll = policy.options.heartbeat_period_s, policy.options.grant_poll_s
    assert poll < period
    assert policy.link is None  # the policy binds to its deployment on Serve's first call
    policy(Ctx(total_num_requests=8))  # demand 4
    policy.link.step()
    assert policy.link.wait_s() == period  # the grant covers the demand
    policy(Ctx(total_num_requests=12))  # demand 6, grant 4: GPUs are on their way
    assert policy.link.wait_s() == poll
    clock.advance(GRANT_POLL_WINDOW_S - 1)
    assert policy.link.wait_s() == poll
    clock.advance(1)
    assert policy.link.wait_s() == period  # the window is over: the cluster has no more for it
    client.grant = Allocation.of(A100=6)
    policy.link.step()
    assert policy.link.wait_s() == period
    policy(Ctx(total_num_requests=16))  # demand 8 above the grant of 6: a new window
    assert policy.link.wait_s() == poll


def test_the_link_thread_sends_a_new_demand_without_waiting_for_its_period():
    client = FakeArbiterClient(grant=Allocation.of(A100=1))
    opts = TidalPolicyOptions(gpu_types=["A100"], heartbeat_period_s=5.0, grant_poll_s=5.0)
    link = ArbiterLink(
        ServeTarget("shop", "Digits", 0, 8),
        "shop.Digits",
        opts,
        lambda name, ns: client,
        inspector_factory=FakeInspector,
    )
    link.report(1, {}, 0)
    link.start()
    try:
        assert _wait_until(lambda: [h["demand_units"] for h in client.heartbeats] == [1], timeout_s=10)
        link.report(3, {}, 1)  # a spike: the arbiter hears of it now, not in 5 s
        assert _wait_until(lambda: [h["demand_units"] for h in client.heartbeats] == [1, 3], timeout_s=2)
    finally:
        link.stop()
        link._thread.join(timeout=10)
    assert not link._thread.is_alive()


def _wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_held_units_are_the_running_replicas_per_gpu_type_they_report():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=2, H100=1))
    policy = make_policy(client, clock)
    rids, metrics = running("A100", "H100", None)
    policy(
        Ctx(total_num_requests=6, current_num_replicas=3, running_replicas=rids, aggregated_metrics=metrics)
    )
    policy.link.step()
    assert client.heartbeats[-1]["held"] == {"A100": 2, "H100": 1}


def test_a_replica_that_stopped_is_still_held_while_it_drains():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=2))
    policy = make_policy(client, clock)
    rids, metrics = running("A100", "A100")
    policy(Ctx(6, 2, rids, metrics))
    clock.advance(1.0)
    policy(Ctx(6, 1, rids[:1], metrics))
    policy.link.step()
    assert client.heartbeats[-1]["held"] == {"A100": 2}
    clock.advance(policy.options.drain_hold_s)
    policy(Ctx(6, 1, rids[:1], metrics))
    policy.link.step()
    assert client.heartbeats[-1]["held"] == {"A100": 1}


def test_an_unreachable_arbiter_means_no_registration_and_load_based_scaling():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=1), available=False)
    policy = make_policy(client, clock)
    policy(Ctx(total_num_requests=9))
    policy.link.step()
    assert client.registered == [] and client.heartbeats == []
    assert policy(Ctx(total_num_requests=9))[0] == 5


def test_a_grant_goes_stale_when_the_arbiter_stops_answering():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=1))
    policy = make_policy(client, clock)
    policy(Ctx(total_num_requests=9))
    policy.link.step()
    assert policy(Ctx(total_num_requests=9))[0] == 1
    clock.advance(policy.options.grant_ttl_s + 0.1)
    assert policy(Ctx(total_num_requests=9))[0] == 5


def test_an_expired_registration_is_renewed_on_the_next_round():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=1))
    policy = make_policy(client, clock)
    policy(Ctx(total_num_requests=2))
    policy.link.step()
    client.known = False  # e.g. the arbiter restarted without our registration
    policy.link.step()
    policy.link.step()
    assert len(client.registered) == 2


def test_a_cold_start_reports_demand_while_serve_does_not_call_the_policy():
    clock = ManualClock(100.0)
    client = FakeArbiterClient()
    policy = make_policy(client, clock)  # min_replicas 0 (Cfg)
    policy(Ctx(total_num_requests=0, current_num_replicas=0))
    policy.link.step()
    assert client.heartbeats[-1]["demand_units"] == 0
    # A request arrives: Serve's cold-start path starts a replica without calling the policy.
    clock.advance(policy.options.stale_after_s + 0.5)
    policy.link.step()
    assert client.heartbeats[-1]["demand_units"] == 1


def test_a_policy_silent_for_longer_than_keepalive_stops_heartbeating():
    clock = ManualClock(100.0)
    client = FakeArbiterClient()
    policy = make_policy(client, clock)
    policy(Ctx(total_num_requests=2))
    policy.link.step()
    n = len(client.heartbeats)
    clock.advance(policy.options.keepalive_s + 1)
    policy.link.step()
    assert len(client.heartbeats) == n


def test_replica_gpu_types_come_from_the_custom_metrics_of_running_replicas_only():
    rids, metrics = running("A100", None)
    metrics[GPU_TYPE_METRIC_PREFIX + "H100"] = {Rid("gone"): 1.0}
    assert replica_gpu_types(Ctx(running_replicas=rids, aggregated_metrics=metrics)) == {
        "r0": "A100",
        "r1": None,
    }


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_falling_back_and_coming_back_are_each_logged_once():
    handler = ListHandler()
    log = logging.getLogger("ray.serve.tidal")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        clock = ManualClock(100.0)
        client = FakeArbiterClient(grant=Allocation.of(A100=1), available=False)
        policy = make_policy(client, clock)
        policy(Ctx(total_num_requests=2))
        assert handler.records == []  # nothing tried yet: no news is not bad news
        for _ in range(5):
            policy.link.step()
            clock.advance(0.5)
            policy(Ctx(total_num_requests=2))
        client.is_available = True
        for _ in range(3):
            policy.link.step()
            clock.advance(0.5)
            policy(Ctx(total_num_requests=2))
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    fallback = [r for r in handler.records if "scaling on load alone" in r.getMessage()]
    back = [r for r in handler.records if "capped at its grant" in r.getMessage()]
    assert len(fallback) == 1 and fallback[0].levelno == logging.WARNING
    assert len(back) == 1


# ----------------------------------------------------------------- any deployment: no code in the replica


def test_a_user_deployment_registers_as_app_and_deployment_with_its_own_bounds_and_gpus():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=1))
    inspector = FakeInspector(DeploymentSnapshot(2.0, ("A100", "H100"), {}))
    policy = policy_class(client, clock, inspector)(gpu_types=["A100", "H100"], priority=50, slo_p99_ms=80)
    policy(Ctx(total_num_requests=4, config=Cfg(min_replicas=1, max_replicas=5)))
    policy.link.step()
    (spec,) = client.registered
    assert spec.name == "shop.Digits"
    assert (spec.min_replicas, spec.max_replicas, spec.gpus_per_replica) == (1, 5, 2.0)
    assert (spec.gpu_types, spec.priority, spec.slo_p99_ms) == (("A100", "H100"), 50, 80)
    assert inspector.calls == [("shop", "Digits")]


def test_replicas_that_push_no_metric_get_their_gpu_type_from_the_link_once_and_it_is_cached():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=1, H100=2))
    inspector = FakeInspector(DeploymentSnapshot(1.0, ("A100", "H100"), {}))
    policy = make_policy(client, clock, inspector=inspector)
    rids = [Rid("a"), Rid("b"), Rid("c")]
    ctx = Ctx(total_num_requests=6, current_num_replicas=3, running_replicas=rids)
    policy(ctx)
    policy.link.step()  # learns the spec and the grant; replicas not placed yet
    policy(ctx)
    policy.link.step()
    # Until resolved, unknown replicas count on the grant's types (never dropped): 1 A100 + 2 H100.
    assert client.heartbeats[-1]["held"] == {"A100": 1, "H100": 2}
    inspector.snapshot = DeploymentSnapshot(1.0, ("A100", "H100"), {"a": "H100", "b": "H100", "c": "H100"})
    policy(ctx)
    policy.link.step()  # resolves the three off the control loop
    policy(ctx)
    policy.link.step()
    assert client.heartbeats[-1]["held"] == {"H100": 3}
    calls = len(inspector.calls)
    for _ in range(3):
        policy(ctx)
        policy.link.step()
    assert len(inspector.calls) == calls  # cached: no more calls while every replica is known


def test_the_pushed_metric_is_the_fast_path_and_needs_no_call_to_serve():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=2))
    inspector = FakeInspector()
    policy = make_policy(client, clock, inspector=inspector)
    rids, metrics = running("A100", "A100")
    for _ in range(3):
        policy(Ctx(4, 2, rids, metrics))
        policy.link.step()
    assert len(inspector.calls) == 1  # the spec only
    assert client.heartbeats[-1]["held"] == {"A100": 2}


def test_a_deployment_asking_for_no_gpu_is_not_registered_and_scales_on_load():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=1))
    policy = make_policy(client, clock, inspector=FakeInspector(DeploymentSnapshot(0.0, ("A100",), {})))
    policy(Ctx(total_num_requests=9))
    policy.link.step()
    assert client.registered == []
    assert policy(Ctx(total_num_requests=9))[0] == 5


def test_serves_long_delays_give_one_warning_in_the_log_and_in_every_heartbeat():
    handler = ListHandler()
    log = logging.getLogger("ray.serve.tidal")
    log.addHandler(handler)
    try:
        clock = ManualClock(100.0)
        client = FakeArbiterClient(grant=Allocation.of(A100=1))
        serve_defaults = Cfg(upscale_delay_s=30.0, downscale_delay_s=600.0)
        # Serve builds a new policy at every redeploy: the controller's log still says it once.
        for _ in range(2):
            policy = make_policy(client, clock, name="slow-delays")
            for _ in range(3):
                policy(Ctx(total_num_requests=2, config=serve_defaults))
                policy.link.step()
    finally:
        log.removeHandler(handler)
    warned = [r.getMessage() for r in handler.records if r.levelno == logging.WARNING]
    assert len(warned) == 2  # one for each delay, once
    assert "downscale_delay_s is 600 s" in warned[0]
    assert "Fix: set autoscaling_config.downscale_delay_s: 1" in warned[0]
    assert "upscale_delay_s is 30 s" in warned[1]
    assert client.heartbeats[-1]["progress"]["warnings"] == warned


def test_replicas_not_pinned_to_the_accepted_types_are_warned_about():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=1))
    policy = make_policy(client, clock, inspector=FakeInspector(DeploymentSnapshot(1.0, (), {})))
    policy(Ctx(total_num_requests=2))
    policy.link.step()
    (warning,) = client.heartbeats[-1]["progress"]["warnings"]
    assert "not pinned to a GPU type" in warning and "label_selector" in warning


def test_the_heartbeat_tells_tidal_status_the_replicas_and_a_pushed_p99():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=2))
    policy = make_policy(client, clock)
    rids, metrics = running("A100", "A100")
    metrics["tidal_p99_ms"] = {rids[0]: 40.0, rids[1]: 55.0}
    policy(Ctx(4, 2, rids, metrics))
    policy.link.step()
    progress = client.heartbeats[-1]["progress"]
    assert (progress["replicas"], progress["p99_ms"]) == (2, 55.0)
    assert (progress["serve_app"], progress["serve_deployment"]) == ("shop", "Digits")


def test_a_deleted_deployment_unregisters_and_a_redeployed_one_keeps_its_registration():
    clock = ManualClock(100.0)
    client = FakeArbiterClient(grant=Allocation.of(A100=1))
    inspector = FakeInspector()
    policy = make_policy(client, clock, inspector=inspector)
    policy(Ctx(total_num_requests=2))
    policy.link.step()
    policy.link.close_wait_s = 0.0  # one look: still in Serve, so a new version took over
    policy.link.close()
    assert client.unregistered == []
    inspector.snapshot = None  # gone from Serve's controller
    policy.link.close()
    assert client.unregistered == ["digits"]

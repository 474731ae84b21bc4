"""The arbiter as a Ray actor: one named, detached, restartable actor per cluster ("tidal-arbiter" in "tidal").

The only place where ``ResourceArbiter`` (a plain class) meets Ray. The actor:

- is created with get-if-exists (``get_or_create_arbiter``), lives on the head node (``node:__internal_head__``,
  so that losing a GPU node never takes the arbiter with it), and is restarted by Ray if its process dies
  (``max_restarts=-1``; calls in flight are retried, ``max_task_retries=-1``: every method is idempotent);
- ticks on its own in a background thread, every ``tick_interval_s`` (1 s by default), and early, as soon as
  ``ResourceArbiter.needs_early_tick()`` turns true (a registration, a heartbeat that released GPUs, or a
  service whose demand rose above its grant), so that released GPUs reach their next holder, and a spike its
  decision, within milliseconds rather than at the next period;
- persists ``dump_state()`` and its current policy config after every change, in Ray's internal KV (held by
  the GCS). That is what survives an actor restart wherever the new process lands: a file in the session dir
  lives on one node only, while the KV is cluster-wide and goes away with the cluster, so a new cluster starts
  clean. With ``state_path`` set (``arbiter.state_path`` in the policy file) it also writes the state to that
  file, which can outlive the cluster; it is read only when the KV has nothing. A saved state or config that
  no longer parses is set aside (``tidal.cluster.state_store``: renamed, with an error log) and the actor starts
  clean rather than failing on every restart; ``tidal arbiter reset`` clears it with no actor
  (``reset_arbiter_state``);
- after a restore, waits to hear from each holder (or ``restore_grace_s``) before it stops one by force;
- refuses a registration or heartbeat with a bad value (``SpecError``, naming the field), and keeps the last
  good grants when a tick's decision raises (``ArbiterConfig.contain_errors``);
- exports Prometheus metrics on ``metrics_port`` (``tidal.cluster.metrics``);
- swaps its policy config with ``reload_config``, which validates first, so that a bad file leaves the
  running config in place;
- keeps idle, preloaded worker processes on the GPU nodes when ``warm_pool`` is configured
  (``tidal.cluster.warm_pool``), in a thread of its own, so that a new replica does not wait for a Python process.

The actor is threaded (``max_concurrency``): heartbeats are served while a tick runs; one lock serialises
every touch of the arbiter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from tidal.cluster.arbiter import ArbiterConfig, ResourceArbiter, TickReport
from tidal.cluster.model import GpuType, GrantView, WorkloadName, WorkloadSpec
from tidal.cluster.policy_file import PolicyFileModel, arbiter_config, load_policy_file, parse_policy_file
from tidal.cluster.ray_backend import RayBackend
from tidal.cluster.specs import parse_workload_spec
from tidal.cluster.state_store import load_or_set_aside, reset_saved_state, state_keys
from tidal.policies.config import PolicyConfigModel, build_policy

logger = logging.getLogger(__name__)

ARBITER_NAME = "tidal-arbiter"
ARBITER_NAMESPACE = "tidal"
KV_NAMESPACE = "tidal"


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


class KvStore:
    """Ray's internal KV (held by the GCS) as a ``tidal.cluster.state_store.StateStore``; needs a connected Ray."""

    def get(self, key: bytes) -> bytes | None:
        return _kv()._internal_kv_get(key, namespace=KV_NAMESPACE)

    def put(self, key: bytes, value: bytes) -> None:
        _kv()._internal_kv_put(key, value, overwrite=True, namespace=KV_NAMESPACE)

    def delete(self, key: bytes) -> None:
        _kv()._internal_kv_del(key, namespace=KV_NAMESPACE)

    def keys(self, prefix: bytes) -> list[bytes]:
        return list(_kv()._internal_kv_list(prefix, namespace=KV_NAMESPACE))


def _actor_config(cfg: PolicyFileModel) -> ArbiterConfig:
    # One workload's bad data or a policy bug must not freeze every grant: the actor's ticks contain errors.
    return dataclasses.replace(arbiter_config(cfg), contain_errors=True)


class ArbiterActor:
    """The actor class (wrapped by ``ray.remote`` in ``get_or_create_arbiter``). See the module docstring.

    Args:
        config: the validated policy file, as a dict (``PolicyFileModel.model_dump()``).
        name: the actor's name, which also keys its persisted state.
        state_path: optional file for a copy of the state (overrides ``arbiter.state_path`` of the config).
        metrics_port: Prometheus port (overrides ``arbiter.metrics_port``; 0 or None: no exporter).
        tick_interval_s: overrides ``arbiter.tick_interval_s``.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        name: str = ARBITER_NAME,
        state_path: str | None = None,
        metrics_port: int | None = None,
        tick_interval_s: float | None = None,
    ) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.name = name
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ticked = threading.Condition()  # notified after every tick (``watch_grant`` waits on it)
        self._tick_seq = 0
        self._tick_interval_override = tick_interval_s
        self._store = KvStore()
        keys = state_keys(name)
        self._state_key, self._config_key = keys["state"], keys["config"]
        # A restarted actor gets its constructor arguments again: the config it was last told to use (by
        # reload_config) is the one in the KV, and wins, unless it no longer parses (then it is set aside).
        saved_cfg = load_or_set_aside(
            self._store, self._config_key, lambda raw: parse_policy_file(json.loads(raw), "saved arbiter config"),
            "saved arbiter config", time.time(),
        )  # fmt: skip
        self.cfg: PolicyFileModel = saved_cfg or parse_policy_file(dict(config or {}), "actor config")
        self._state_path = state_path or self.cfg.arbiter.state_path
        self.backend = RayBackend()
        self.arbiter = ResourceArbiter(
            build_policy(self.cfg), self.backend, config=_actor_config(self.cfg),
            prices_per_gpu_hour=dict(self.cfg.prices_per_gpu_hour),
        )
        self.restored = self._restore()
        self._last_persisted = ""
        self.tick_count = 0
        self.tick_errors = 0
        self.early_ticks = 0
        self.tick_durations_s: deque[float] = deque(maxlen=2000)
        self.wake_latencies_s: deque[float] = deque(maxlen=2000)
        self._woken_at: float | None = None
        self.last_tick_s = 0.0
        self.last_error: str | None = None
        self.metrics = None
        port = metrics_port if metrics_port is not None else self.cfg.arbiter.metrics_port
        if port:
            from tidal.cluster.metrics import ArbiterMetrics

            self.metrics = ArbiterMetrics()
            self.metrics.serve(port, addr=self.cfg.arbiter.metrics_host)
            self.arbiter.listeners.append(self.metrics.on_tick)
        self.metrics_port = port or None
        self._persist(force=True)
        self.warm_pool_rounds = 0
        self.warm_pool_started = 0
        self.warm_pool_last: dict[str, Any] = {}
        self._seen_generation = self.arbiter.generation
        self._grants_moved_s = float("-inf")  # time.monotonic() of the last grant change
        self._thread = threading.Thread(target=self._loop, name="tidal-arbiter-tick", daemon=True)
        self._thread.start()
        self._warm_thread = threading.Thread(target=self._warm_loop, name="tidal-warm-pool", daemon=True)
        self._warm_thread.start()
        logger.info(
            "arbiter %s up (policy %s, tick %.2f s, restored %d workloads, metrics port %s)",
            name, self.cfg.policy, self.tick_interval_s, self.restored, self.metrics_port,
        )

    # ------------------------------------------------------------------------------- client calls

    def ping(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "restored": self.restored,
            "policy": self.cfg.policy,
            "reconstructed": ray.get_runtime_context().was_current_actor_reconstructed,
        }

    def register(
        self, spec: WorkloadSpec | Mapping[str, Any], meta: Mapping[str, Any] | None = None,
        demand_units: int | None = None, held: Mapping[GpuType, int] | None = None,
    ) -> GrantView:
        if isinstance(spec, Mapping):
            spec = parse_workload_spec(spec)  # SpecError names the field, the value and what is valid
        with self._lock:
            view = self.arbiter.register(spec, meta, demand_units, held)
            # A new workload must survive a restart even before the next tick persists.
            self._persist()
        self._maybe_wake()
        return view

    def heartbeat(
        self,
        name: WorkloadName,
        *,
        demand_units: int | None = None,
        held: Mapping[GpuType, int] | None = None,
        progress: Mapping[str, Any] | None = None,
        seconds_since_checkpoint: float | None = None,
    ) -> GrantView:
        with self._lock:
            view = self.arbiter.heartbeat(
                name, demand_units=demand_units, held=held, progress=progress,
                seconds_since_checkpoint=seconds_since_checkpoint,
            )
        self._maybe_wake()
        return view

    def unregister(self, name: WorkloadName) -> bool:
        with self._lock:
            ok = self.arbiter.unregister(name)
            self._persist()
        self._maybe_wake()
        return ok

    def grant_of(self, name: WorkloadName) -> GrantView:
        with self._lock:
            return self.arbiter.grant_of(name)

    @ray.method(concurrency_group="watch")
    def watch_grant(
        self, name: WorkloadName, known: Mapping[GpuType, int] | None = None, timeout_s: float = 10.0
    ) -> GrantView:
        """The workload's view as soon as its grant differs from ``known`` (units per GPU type), or it is
        not registered, or after ``timeout_s`` (at most 60) with the grant unchanged.

        A held call, in its own concurrency group (``watch``) so that waiting watchers never take the
        threads heartbeats are served on: a job's controller keeps one in flight and hears of a shrink the
        moment the tick decides it, not at its next heartbeat (0.25-0.5 s later, a third of a ~1.3 s
        reclaim on this machine).
        """
        want = {t: int(n) for t, n in (known or {}).items() if n}
        deadline = time.monotonic() + max(0.0, min(float(timeout_s), 60.0))
        while True:
            with self._ticked:
                seq = self._tick_seq
            view = self.grant_of(name)
            left = deadline - time.monotonic()
            if not view.registered or view.grant.as_dict() != want or left <= 0 or self._stop.is_set():
                return view
            with self._ticked:
                self._ticked.wait_for(lambda seq=seq: self._tick_seq != seq or self._stop.is_set(), timeout=left)

    # ------------------------------------------------------------------------------- operators

    def status(self) -> dict[str, Any]:
        with self._lock:
            s = self.arbiter.status()
        s["arbiter"] = self.stats()
        return s

    def events(self, since_s: float = float("-inf")) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"t_s": e.t_s, "kind": e.kind, "workload": e.workload, "detail": dict(e.detail)}
                for e in self.arbiter.events(since_s)
            ]

    def dump_state(self) -> dict[str, Any]:
        with self._lock:
            return self.arbiter.dump_state()

    def config(self) -> dict[str, Any]:
        return self.cfg.model_dump()

    def stats(self) -> dict[str, Any]:
        """Loop health and latency figures (seconds), for ``tidal status`` and the benchmarks."""
        durs = sorted(self.tick_durations_s)
        wakes = sorted(self.wake_latencies_s)
        return {
            "pid": os.getpid(),
            "ticks": self.tick_count,
            "early_ticks": self.early_ticks,
            "tick_errors": self.tick_errors,
            "last_error": self.last_error,
            # Decisions that raised inside a tick (the last good grants stayed): ``error`` events.
            "decide_errors": self.arbiter.tick_errors,
            "last_decide_error": self.arbiter.last_tick_error,
            "tick_interval_s": self.tick_interval_s,
            "last_tick_age_s": time.time() - self.last_tick_s if self.last_tick_s else None,
            "tick_p50_s": _pct(durs, 0.5),
            "tick_p99_s": _pct(durs, 0.99),
            "wake_to_tick_p50_s": _pct(wakes, 0.5),
            "wake_to_tick_p99_s": _pct(wakes, 0.99),
            "restored_workloads": self.restored,
            "metrics_port": self.metrics_port,
            "inventory_read_failures": self.backend.consecutive_failures,
            "warm_pool": {
                "spare_workers_per_node": self.cfg.warm_pool.spare_workers_per_node,
                "rounds": self.warm_pool_rounds, "workers_started": self.warm_pool_started, "last": self.warm_pool_last,
            },
        }

    def reload_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Validates ``config`` and swaps it in; on any error the running config stays and the error is raised.

        The policy state is kept when the policy stays the same, and reset when it changes (a state is
        only meaningful to the policy that wrote it).
        """
        new_cfg = parse_policy_file(dict(config), "reload_config")
        new_policy = build_policy(new_cfg)
        with self._lock:
            old_policy_name = self.cfg.policy
            self.arbiter.reconfigure(
                new_policy,
                _actor_config(new_cfg),
                new_cfg.prices_per_gpu_hour,
                reset_policy_state=new_cfg.policy != old_policy_name,
            )
            self.cfg = new_cfg
            self._kv_put(self._config_key, json.dumps(new_cfg.model_dump()).encode())
        self._wake.set()
        logger.info("policy config reloaded (policy %s -> %s)", old_policy_name, new_cfg.policy)
        return {"policy": new_cfg.policy, "tick_interval_s": self.tick_interval_s}

    def tick_now(self) -> dict[str, Any]:
        """Runs one tick at once (tests, operators) and returns its report as a dict."""
        report = self._tick()
        return {"now_s": report.now_s, "grants": {n: g.as_dict() for n, g in report.grants.items()}}

    def forget_state(self) -> None:
        """Deletes the persisted state (``tidal down``, tests); the in-memory state stays until the actor exits."""
        self._store.delete(self._state_key)
        self._store.delete(self._config_key)
        if self._state_path:
            Path(self._state_path).unlink(missing_ok=True)

    def shutdown(self) -> None:
        """Stops the tick loop (the actor itself is ended with ``ray.kill``)."""
        self._stop.set()
        self._wake.set()
        with self._ticked:
            self._ticked.notify_all()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------------------- the loop

    @property
    def tick_interval_s(self) -> float:
        return self._tick_interval_override or self.cfg.arbiter.tick_interval_s

    def _maybe_wake(self) -> None:
        if self.arbiter.needs_early_tick() and not self._wake.is_set():
            self._woken_at = time.perf_counter()
            self._wake.set()

    def _loop(self) -> None:
        next_due = time.monotonic()
        while not self._stop.is_set():
            woken = self._wake.wait(timeout=max(0.0, next_due - time.monotonic()))
            if self._stop.is_set():
                break
            self._wake.clear()
            if woken:
                self.early_ticks += 1
                if self._woken_at is not None:
                    self.wake_latencies_s.append(time.perf_counter() - self._woken_at)
                    self._woken_at = None
            try:
                self._tick()
            except Exception as e:
                # The one broad except: a failed tick (e.g. the node table unreadable for a while) must not
                # end the loop; the next tick tries again, and status() shows the error.
                self.tick_errors += 1
                self.last_error = repr(e)
                logger.exception("arbiter tick failed")
            next_due = time.monotonic() + self.tick_interval_s

    def _warm_loop(self) -> None:
        """Keeps idle workers on the GPU nodes (``tidal.cluster.warm_pool``) while ``warm_pool`` is configured."""
        from tidal.cluster.warm_pool import RayletRpc, WarmPool, nodes_from_ray

        raylets = RayletRpc()
        pool: WarmPool | None = None
        built_from = None
        while not self._stop.wait(timeout=self.cfg.warm_pool.interval_s):
            wp = self.cfg.warm_pool
            if wp.spare_workers_per_node == 0:
                continue
            if pool is None or built_from != wp:  # first round, or reload_config changed the pool
                pool = WarmPool(
                    raylets, spare_workers_per_node=wp.spare_workers_per_node, keep_alive_s=wp.keep_alive_s,
                    max_starts_per_round=wp.max_starts_per_round, node_cooldown_s=wp.node_cooldown_s,
                    quiet_s=wp.quiet_s,
                )  # fmt: skip
                built_from = wp
            try:
                nodes = nodes_from_ray(ray.nodes())
                raylets.forget(n.raylet_address for n in nodes)
                report = pool.run_once(nodes, last_move_s=self._grants_moved_s)
            except Exception as e:  # the pool is an optimisation: never let it take the arbiter down
                logger.warning("warm pool round failed: %r", e)
                continue
            self.warm_pool_rounds += 1
            self.warm_pool_started += sum(report.started.values())
            self.warm_pool_last = {"idle": report.idle, "started": report.started, "errors": report.errors}
            if report.started:
                logger.info("warm pool: idle %s, starting %s", report.idle, report.started)

    def _tick(self) -> TickReport:
        t0 = time.perf_counter()
        with self._lock:
            report = self.arbiter.tick()
            if self.arbiter.generation != self._seen_generation:
                self._seen_generation = self.arbiter.generation
                self._grants_moved_s = time.monotonic()
            self._persist()
            status = self.arbiter.status() if self.metrics is not None else None
        with self._ticked:
            self._tick_seq += 1
            self._ticked.notify_all()
        self.tick_durations_s.append(time.perf_counter() - t0)
        self.tick_count += 1
        self.last_tick_s = time.time()
        if self.metrics is not None and status is not None:
            self.metrics.update(status, tick_s=self.tick_durations_s[-1])
        return report

    # ------------------------------------------------------------------------------- persistence

    def _persist(self, force: bool = False) -> None:
        state = json.dumps(self.arbiter.dump_state(), sort_keys=True, default=str)
        if state == self._last_persisted and not force:
            return
        self._kv_put(self._state_key, state.encode())
        if force and not self._kv_get(self._config_key):
            self._kv_put(self._config_key, json.dumps(self.cfg.model_dump()).encode())
        if self._state_path:
            p = Path(self._state_path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(p.suffix + ".tmp")
            tmp.write_text(state)
            tmp.replace(p)
        self._last_persisted = state

    def _restore(self) -> int:
        """Restores the saved state: the KV's, else the ``state_path`` file's. One that does not parse is set
        aside (the KV key or the file renamed to ``*.bad-<unix seconds>``, with an error log) and the actor
        starts clean."""

        def restore(raw: bytes) -> dict[str, Any]:
            state = json.loads(raw)
            self.arbiter.restore_state(state)  # validates all of it first; raises StateError
            return state

        in_kv = self._store.get(self._state_key) is not None
        state = load_or_set_aside(self._store, self._state_key, restore, "arbiter state", time.time())
        source = "Ray's internal KV"
        if not in_kv and self._state_path:
            p = Path(self._state_path)
            if p.exists():
                source = str(p)
                try:
                    state = restore(p.read_bytes())
                except Exception as e:  # whatever the file holds, the actor must come up
                    aside = p.with_name(f"{p.name}.bad-{int(time.time())}")
                    p.replace(aside)
                    logger.error(
                        "the saved arbiter state %s no longer parses and is set aside as %s: %s: %s. Starting "
                        "without it.", p, aside, type(e).__name__, e,
                    )  # fmt: skip
        if state is None:
            return 0
        n = len(state.get("registrations", []))
        logger.info("restored %d workloads and %d grants from %s", n, len(state.get("grants", {})), source)
        return n

    def _kv_get(self, key: bytes) -> bytes | None:
        return self._store.get(key)

    def _kv_put(self, key: bytes, value: bytes) -> None:
        self._store.put(key, value)


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# ------------------------------------------------------------------------------------------ factory


def resolve_config(config: str | os.PathLike | PolicyConfigModel | Mapping[str, Any] | None) -> PolicyFileModel:
    """A validated policy file from a path, a dict, a model or None (defaults). Raises ``PolicyConfigError``.

    A model of the policy's part alone (``PolicyConfigModel``) gets the default runtime sections.
    """
    if isinstance(config, PolicyFileModel):
        return config
    if isinstance(config, PolicyConfigModel):
        return parse_policy_file(config.model_dump(), "config")
    if config is None or isinstance(config, str | os.PathLike):
        return load_policy_file(config)
    return parse_policy_file(dict(config), "config")


def get_or_create_arbiter(
    config_path: str | os.PathLike | None = None,
    *,
    config: PolicyConfigModel | Mapping[str, Any] | None = None,
    name: str = ARBITER_NAME,
    namespace: str = ARBITER_NAMESPACE,
    state_path: str | None = None,
    metrics_port: int | None = None,
    tick_interval_s: float | None = None,
    max_concurrency: int = 32,
    max_watchers: int = 64,
    ready_timeout_s: float = 60.0,
) -> ray.actor.ActorHandle:
    """The cluster's arbiter actor: the running one if it exists, else a new one. Needs ``ray.init`` first.

    The config (a policy file path, or a dict/model) is validated here, in the caller, so that a bad file
    fails at once with a message naming the field. An existing actor keeps its own config (use
    ``reload_config`` to change it).

    Raises:
        PolicyConfigError: the config is invalid.
        ray.exceptions.GetTimeoutError: the actor did not answer within ``ready_timeout_s``.
    """
    cfg = resolve_config(config if config is not None else config_path)
    # Held watch_grant calls wait in their own group, never on the threads that serve heartbeats; watchers
    # beyond this many queue until one returns (each returns within its timeout, 10 s by default).
    # (Ray takes concurrency groups in ray.remote only, not in .options.)
    remote_cls = ray.remote(concurrency_groups={"watch": max_watchers})(ArbiterActor)
    handle = remote_cls.options(
        name=name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=max_concurrency,
        num_cpus=0,
        # On the head: a lost GPU node must never take the arbiter with it.
        resources={"node:__internal_head__": 0.001},
    ).remote(cfg.model_dump(), name, state_path, metrics_port, tick_interval_s)
    ray.get(handle.ping.remote(), timeout=ready_timeout_s)
    return handle


def get_arbiter(name: str = ARBITER_NAME, namespace: str = ARBITER_NAMESPACE) -> ray.actor.ActorHandle | None:
    """The running arbiter actor, or None."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def kill_arbiter(
    name: str = ARBITER_NAME, namespace: str = ARBITER_NAMESPACE, *, forget_state: bool = True
) -> bool:
    """Ends the arbiter for good (no restart); with ``forget_state`` its persisted state goes too."""
    handle = get_arbiter(name, namespace)
    if handle is None:
        return False
    if forget_state:
        try:
            ray.get(handle.forget_state.remote(), timeout=10)  # (it knows its state_path)
        except Exception:
            logger.warning("the arbiter did not answer; deleting its saved state in the KV directly", exc_info=True)
    ray.kill(handle, no_restart=True)
    if forget_state:
        reset_saved_state(KvStore(), name)  # a wedged actor cannot have done it
    return True


def reset_arbiter_state(
    name: str = ARBITER_NAME, namespace: str = ARBITER_NAMESPACE, *, state_path: str | None = None
) -> list[str]:
    """Clears the arbiter's saved state and config (and their set-aside copies) with no live actor needed.

    An actor that exists (perhaps failing in its constructor, or wedged) is ended first, without a call to
    it, so that it cannot write its state back. Needs ``ray.init`` first. Returns what was removed.
    """
    handle = get_arbiter(name, namespace)
    if handle is not None:
        ray.kill(handle, no_restart=True)
    removed = [k.decode(errors="replace") for k in reset_saved_state(KvStore(), name)]
    if state_path:
        p = Path(state_path)
        for f in [p, *p.parent.glob(f"{p.name}.bad-*")] if p.parent.exists() else []:
            if f.exists():
                f.unlink()
                removed.append(str(f))
    return removed

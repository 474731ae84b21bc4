"""The ``tidal`` command: a local heterogeneous cluster, the arbiter, and the status of both.

::

    tidal up [--config cluster.yaml] [--policy policy.yaml] [--no-arbiter]
    tidal down [--keep-logs]
    tidal env                          # `eval "$(tidal env)"`: Ray's CLIs then work against the cluster
    tidal status [--json] [--address ADDR]
    tidal arbiter start [--config policy.yaml] [--address ADDR] [--metrics-port N] [--metrics-host H]
                       [--tick-interval S]
    tidal arbiter stop [--address ADDR]
    tidal arbiter reset [--address ADDR] [--state-path FILE]   # clear a bad saved state; no live actor needed

Subcommands owned by other packages are added when present: ``tidal serve ...`` (``tidal.serving.cli``), ``tidal
train ...`` (``tidal.training.cli``), ``tidal simulate ...`` (``tidal.cluster.sim.cli``).

What ``tidal up`` started is recorded in ``$TIDAL_HOME/local-cluster.json`` (default ``~/.tidal``), which
points at the cluster's own state file (``tidal.cluster.connect``); ``tidal down`` stops exactly the processes
recorded there.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shlex
import shutil
import sys
from collections.abc import Callable
from typing import Any

from tidal.cluster.connect import (
    POINTER_FILE,
    connect,
    forget_recorded,
    record_cluster,
    recorded_cluster,
    tidal_home,
)
from tidal.cluster.flags import finite_float, port

logger = logging.getLogger("tidal")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _out(msg: str = "") -> None:
    # The CLI's own output (the rest of the package logs).
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _err(msg: str) -> None:
    sys.stderr.write(f"tidal: {msg}\n")
    sys.stderr.flush()


def _on_cluster(address: str | None, body: Callable[[str], int]) -> int:
    """Connects to the cluster (``tidal.cluster.connect``), runs ``body(address)`` and disconnects, whatever
    happens; a cluster that cannot be reached is one clear line and ``EXIT_ERROR``."""
    import ray

    try:
        connected = connect(address)
    except Exception as e:
        _err(str(e))
        return EXIT_ERROR
    try:
        return body(connected)
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------ up / down / env


def cmd_up(args: argparse.Namespace) -> int:
    from tidal.cluster.cluster_spec import load_cluster_spec
    from tidal.cluster.local import LocalCluster

    existing = recorded_cluster()
    if existing is not None:
        if existing.pids():
            _err(
                f"Tidal is already up: a local cluster runs at {existing.address} (dashboard "
                f"{existing.dashboard_url}), recorded in {tidal_home() / POINTER_FILE}. Run `tidal down` first."
            )
            return EXIT_ERROR
        _out(f"Found a record of a cluster whose processes are gone ({existing.address}); replacing it.")
        existing.stop()
        forget_recorded()
    try:
        spec = load_cluster_spec(args.config)
        policy_cfg = None
        if not args.no_arbiter:
            from tidal.cluster.policy_file import load_policy_file

            policy_cfg = load_policy_file(args.policy)
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    gpus = ", ".join(f"{n}x {t}" for t, n in spec.gpus_by_type().items())
    _out(f"Starting a local Ray cluster: head + {len(spec.nodes())} GPU nodes ({gpus}) ...")
    cluster = LocalCluster(spec)
    try:
        cluster.start()
    except Exception as e:
        _err(f"the local cluster did not start: {e}")
        return EXIT_ERROR
    record_cluster(cluster.state_path)
    arbiter_line = "Arbiter: not started (--no-arbiter); start it with `tidal arbiter start`"
    if policy_cfg is not None:
        import ray
        from tidal.cluster.actor import get_or_create_arbiter

        try:
            cluster.activate()
            ray.init(address=cluster.address, namespace="tidal", log_to_driver=False, logging_level=logging.WARNING)
            get_or_create_arbiter(config=policy_cfg, metrics_port=cluster.metrics_port)
            arbiter_line = (
                f"Arbiter: tidal-arbiter (namespace tidal), policy {policy_cfg.policy}, "
                f"metrics http://127.0.0.1:{cluster.metrics_port}/metrics"
            )
        except Exception as e:
            _err(f"the cluster is up, but the arbiter did not start: {e}")
            arbiter_line = "Arbiter: FAILED to start (see above); retry with `tidal arbiter start`"
        finally:
            ray.shutdown()
    _out(f"Local cluster up in {cluster.startup_s:.1f} s.")
    _out(f"  Ray address:   {cluster.address}")
    _out(f"  Dashboard:     {cluster.dashboard_url}")
    _out(f"  Serve HTTP:    port {cluster.serve_http_port} (reserved for Serve's proxy)")
    _out(f"  Nodes:         {', '.join(f'{n} ({r.num_gpus}x {r.gpu_type})' for n, r in cluster.nodes.items())}")
    _out(f"  {arbiter_line}")
    _out(f"  State:         {cluster.state_path}")
    _out("")
    _out("Token authentication is on. For Ray's CLIs (`ray job submit`, `serve deploy`, `ray status`):")
    _out('  eval "$(tidal env)"      # or paste:')
    for line in _export_lines(cluster.env()):
        _out(f"  {line}")
    _out("Stop everything with `tidal down`.")
    return EXIT_OK


def _export_lines(env: dict[str, str]) -> list[str]:
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]


def cmd_env(args: argparse.Namespace) -> int:
    cluster = recorded_cluster()
    if cluster is None or not cluster.pids():
        _err(f"nothing is up (no running local cluster recorded in {tidal_home()}); run `tidal up`")
        return EXIT_ERROR
    for line in _export_lines(cluster.env()):
        _out(line)
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    cluster = recorded_cluster()
    if cluster is None:
        _out(f"Nothing is up: no local cluster is recorded in {tidal_home()}. Nothing was stopped.")
        return EXIT_OK
    running = cluster.pids()
    try:
        stopped = cluster.stop()
    except Exception as e:
        _err(f"could not stop every process of the cluster at {cluster.address}: {e}")
        return EXIT_ERROR
    left = cluster.pids()
    if left:
        _err(f"processes of the cluster still run: {sorted(left)}")
        return EXIT_ERROR
    forget_recorded()
    root = cluster.root_dir
    if not args.keep_logs and cluster._owns_root and root is not None:
        shutil.rmtree(root, ignore_errors=True)
        where = f"removed {root}"
    else:
        where = f"logs kept in {root}"
    if running:
        _out(f"Stopped the local cluster at {cluster.address}: {len(stopped)} processes ({where}).")
    else:
        _out(f"The recorded cluster at {cluster.address} was no longer running; record removed ({where}).")
    return EXIT_OK


# ------------------------------------------------------------------------------------ status


def cmd_status(args: argparse.Namespace) -> int:
    def body(address: str) -> int:
        import ray
        from tidal.cluster.actor import get_arbiter

        handle = get_arbiter()
        if handle is None:
            status = _inventory_only_status()
            status["arbiter"] = None
        else:
            status = ray.get(handle.status.remote(), timeout=15)
        status["address"] = address
        status["services"] = service_rows(status)
        if args.json:
            _out(json.dumps(status, indent=2, sort_keys=True, default=str))
        else:
            render_status(status)
        return EXIT_OK

    return _on_cluster(args.address, body)


def _inventory_only_status() -> dict[str, Any]:
    """Capacity by type from Ray's node table, for a cluster without an arbiter."""
    import ray
    from tidal.cluster.ray_backend import nodes_from_table

    cap: dict[str, float] = {}
    nodes: dict[str, int] = {}
    for n in nodes_from_table(ray.nodes()):
        if n.healthy:
            cap[n.gpu_type] = cap.get(n.gpu_type, 0.0) + n.num_gpus
            nodes[n.gpu_type] = nodes.get(n.gpu_type, 0) + 1
    return {
        "capacity": cap, "nodes": nodes, "granted": {}, "free": dict(cap), "allocation_ratio": 0.0,
        "cost_per_hour": 0.0, "workloads": [], "infeasible": [],
    }


def render_status(status: dict[str, Any]) -> None:
    """Prints ``status`` (an arbiter ``status()`` dict) as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cap: dict[str, float] = status.get("capacity", {})
    granted: dict[str, float] = status.get("granted", {})
    free: dict[str, float] = status.get("free", {})
    inv = Table(title=f"Inventory  ({status.get('address', '?')})")
    for col in ("GPU type", "nodes", "GPUs", "granted", "free"):
        inv.add_column(col, justify="right" if col != "GPU type" else "left")
    for t in sorted(set(cap) | set(granted)):
        inv.add_row(
            t, str(status.get("nodes", {}).get(t, 0)), _num(cap.get(t, 0.0)), _num(granted.get(t, 0.0)),
            _num(free.get(t, 0.0)),
        )
    inv.add_row(
        "[b]all[/b]", str(sum(status.get("nodes", {}).values())), _num(sum(cap.values())),
        _num(sum(granted.values())), _num(sum(free.values())),
    )
    console.print(inv)
    wl = Table(title="Workloads")
    for col in ("name", "kind", "prio", "units (min-max)", "demand", "grant by type", "held", "GPUs", "$/hour"):
        wl.add_column(col)
    for w in status.get("workloads", []):
        wl.add_row(
            w["name"], w["kind"], str(w["priority"]), f"{w['min_units']}-{w['max_units']}", str(w["demand_units"]),
            _alloc(w.get("grant", {})), _alloc(w.get("held", {})),
            _num(sum(w.get("grant_gpus", {}).values())), f"{w.get('cost_per_hour', 0.0):.2f}",
        )
    if not status.get("workloads"):
        wl.add_row("(none)", "", "", "", "", "", "", "", "")
    console.print(wl)
    rows = service_rows(status)
    if rows:
        sv = Table(title="Services (Serve deployments under Tidal)")
        cols = ("service", "Serve app/deployment", "replicas", "demand", "grant", "held", "GPU types", "p99 / SLO ms")
        for col in cols:
            sv.add_column(col)
        for r in rows:
            sv.add_row(
                r["name"], r["serve"], str(r["replicas"]), str(r["demand"]), _alloc(r["grant"]), _alloc(r["held"]),
                ", ".join(r["gpu_types"]), r["p99"],
            )
        console.print(sv)
        for r in rows:
            for w in r["warnings"]:
                console.print(f"[yellow]warning[/yellow] {w}")
    jobs = job_rows(status)
    if jobs:
        tj = Table(title="Training jobs (TidalTrainer)")
        for col in ("job", "workers (min-max)", "GPU type", "phase", "step", "resizes", "steps lost", "goodput"):
            tj.add_column(col)
        for r in jobs:
            tj.add_row(
                r["name"], f"{r['size']} ({r['bounds']})", r["gpu_type"], r["phase"],
                "-" if r["step"] is None else str(r["step"]), str(r["resizes"]), str(r["steps_lost"]), r["goodput"],
            )  # fmt: skip
        console.print(tj)
    console.print(
        f"Allocation ratio: [b]{status.get('allocation_ratio', 0.0):.0%}[/b]   "
        f"Cost: [b]${status.get('cost_per_hour', 0.0):.2f}/hour[/b]   "
        f"Policy: {status.get('policy', '-')}"
    )
    for inf in status.get("infeasible", []):
        console.print(f"[yellow]infeasible[/yellow] {inf['workload']}: {inf['reason']}")
    arb = status.get("arbiter")
    if arb is None:
        console.print("[yellow]No arbiter is running[/yellow]: start it with `tidal arbiter start`.")
    elif arb:
        p50 = arb.get("tick_p50_s")
        console.print(
            f"Arbiter: {arb.get('ticks', 0)} ticks every {arb.get('tick_interval_s')} s"
            + (f", tick p50 {p50 * 1e3:.1f} ms" if p50 is not None else "")
            + (f", [red]{arb['tick_errors']} failed ticks[/red] (last: {arb.get('last_error')})" if arb.get("tick_errors") else "")
        )


def service_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Every service the arbiter knows, whoever deployed it: what ``tidal status`` shows of each.

    Replicas, the Serve app and deployment, p99 and warnings come from what its autoscaling hook reports
    (``progress``); replicas fall back to what it holds, p99 to ``-`` when no replica reports one.

    Example: a workload ``{"name": "shop.Digits", "kind": "service", "demand_units": 3, "grant": {"A100": 2},
    "held": {"A100": 2}, "progress": {"replicas": 2, "p99_ms": 41.5, "slo_p99_ms": 200}}`` ->
    ``{"name": "shop.Digits", "replicas": 2, "demand": 3, ..., "p99": "41.5 / 200"}``.
    """
    out = []
    for w in status.get("workloads", []):
        if w.get("kind") != "service":
            continue
        progress = w.get("progress") or {}
        held = w.get("held") or {}
        p99, slo = progress.get("p99_ms"), progress.get("slo_p99_ms")
        app, dep = progress.get("serve_app"), progress.get("serve_deployment")
        out.append(
            {
                "name": w["name"],
                "serve": f"{app or '-'}/{dep}" if dep else "-",
                "replicas": progress.get("replicas", sum(held.values())),
                "demand": w.get("demand_units", 0),
                "grant": w.get("grant") or {},
                "held": held,
                "gpu_types": progress.get("gpu_types") or sorted(set(held) | set(w.get("grant") or {})),
                "p99_ms": p99,
                "p99": f"{_num(p99) if p99 is not None else '-'} / {_num(slo) if slo is not None else '-'}",
                "warnings": list(progress.get("warnings") or []),
            }
        )
    return out


def job_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Every training job the arbiter knows that reports a ``TidalTrainer``'s progress (Tidal's own jobs and
    users' scripts alike): what ``tidal status`` shows of each.

    ``goodput``: the share of the worker-seconds the job held GPUs for that it spent training (not starting a
    worker group, yielding or waiting for one), as its controller counts them; ``-`` before it has held any.

    Example: a workload ``{"name": "digits", "kind": "training", "progress": {"workers": 2, "gpu_type": "H100",
    "step": 120, "phase": "running", "resizes": 1, "steps_lost": 0, "goodput": 0.91}}`` ->
    ``{"name": "digits", "size": 2, "gpu_type": "H100", "step": 120, "phase": "running", ..., "goodput": "91%"}``.
    """
    out = []
    for w in status.get("workloads", []):
        progress = w.get("progress") or {}
        if w.get("kind") == "service" or "workers" not in progress:
            continue
        goodput = progress.get("goodput")
        out.append(
            {
                "name": w["name"],
                "size": int(progress.get("workers") or 0),
                "bounds": f"{w.get('min_units', '?')}-{w.get('max_units', '?')}",
                "gpu_type": progress.get("gpu_type") or "-",
                "phase": progress.get("phase") or "-",
                "step": progress.get("step"),
                "resizes": int(progress.get("resizes") or 0),
                "steps_lost": int(progress.get("steps_lost") or 0),
                "goodput": f"{goodput:.0%}" if isinstance(goodput, int | float) else "-",
            }
        )
    return out


def _num(x: float) -> str:
    return f"{x:g}"


def _alloc(d: dict[str, float]) -> str:
    return ", ".join(f"{t}: {n}" for t, n in sorted(d.items())) or "-"


# ------------------------------------------------------------------------------------ arbiter


def cmd_arbiter_start(args: argparse.Namespace) -> int:
    import ray
    from tidal.cluster.actor import get_arbiter, get_or_create_arbiter
    from tidal.cluster.policy_file import load_policy_file, parse_policy_file

    # Validate before touching the cluster: a bad file changes nothing, a running arbiter keeps its config.
    try:
        cfg = load_policy_file(args.config)
        if args.metrics_host is not None:
            data = cfg.model_dump()
            data["arbiter"]["metrics_host"] = args.metrics_host
            cfg = parse_policy_file(data, f"{args.config or '(defaults)'} with --metrics-host")
    except ValueError as e:
        _err(f"{e}\nThe policy config was refused; nothing was changed.")
        return EXIT_USAGE

    def body(address: str) -> int:
        handle = get_arbiter()
        if handle is not None:
            try:
                result = ray.get(handle.reload_config.remote(cfg.model_dump()), timeout=30)
            except ray.exceptions.RayTaskError as e:
                _err(f"the arbiter refused the config and keeps its old one: {e.cause if hasattr(e, 'cause') else e}")
                return EXIT_USAGE
            _out(f"The arbiter was already running at {address}; its config was reloaded (policy {result['policy']}).")
            return EXIT_OK
        metrics_port = args.metrics_port
        if metrics_port is None and cfg.arbiter.metrics_port is None:
            recorded = recorded_cluster()
            if recorded is not None and recorded.address == address:
                metrics_port = recorded.metrics_port
        get_or_create_arbiter(config=cfg, metrics_port=metrics_port, tick_interval_s=args.tick_interval)
        port = metrics_port or cfg.arbiter.metrics_port
        _out(
            f"Arbiter started at {address}: tidal-arbiter (namespace tidal), policy {cfg.policy}"
            + (f", metrics on {cfg.arbiter.metrics_host}:{port}" if port else "")
        )
        return EXIT_OK

    return _on_cluster(args.address, body)


def cmd_arbiter_stop(args: argparse.Namespace) -> int:
    from tidal.cluster.actor import kill_arbiter

    def body(address: str) -> int:
        if kill_arbiter():
            _out(f"Arbiter stopped at {address} (its persisted state was deleted).")
        else:
            _out(f"No arbiter is running at {address}.")
        return EXIT_OK

    return _on_cluster(args.address, body)


def cmd_arbiter_reset(args: argparse.Namespace) -> int:
    from tidal.cluster.actor import reset_arbiter_state

    def body(address: str) -> int:
        removed = reset_arbiter_state(state_path=args.state_path)
        _out(
            f"Arbiter reset at {address}: removed {', '.join(removed)}."
            if removed
            else f"Arbiter reset at {address}: no saved state was there."
        )
        _out("Start it again with `tidal arbiter start`; workloads register again at their next heartbeat.")
        return EXIT_OK

    return _on_cluster(args.address, body)


# ------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidal", description="Training and inference on one heterogeneous GPU cluster.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start a local heterogeneous Ray cluster and the arbiter")
    p.add_argument("--config", default=None, help="cluster spec YAML (default: cluster/configs/local.yaml)")
    p.add_argument("--policy", default=None, help="policy config YAML for the arbiter (default: built-in)")
    p.add_argument("--no-arbiter", action="store_true", help="do not start the arbiter")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the local cluster that `tidal up` started")
    p.add_argument("--keep-logs", action="store_true", help="keep the cluster's temp dir (logs)")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("env", help='print the environment for Ray\'s CLIs: eval "$(tidal env)"')
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("status", help="inventory, demand, grants, allocation ratio and cost")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--address", default=None, help="Ray address (default: the local cluster, else $RAY_ADDRESS)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("arbiter", help="the arbiter actor")
    asub = p.add_subparsers(dest="arbiter_command", required=True)
    a = asub.add_parser("start", help="start the arbiter (or reload its config if it runs)")
    a.add_argument("--config", default=None, help="policy config YAML (validated first)")
    a.add_argument("--address", default=None, help="Ray address (default: the local cluster, else $RAY_ADDRESS)")
    a.add_argument(
        "--metrics-port", type=port, default=None, help="Prometheus port (default: config or the local cluster's)"
    )
    a.add_argument(
        "--metrics-host",
        default=None,
        help="address the metrics exporter binds (default: config, 127.0.0.1); 0.0.0.0 lets Prometheus on "
        "another machine scrape it",
    )
    a.add_argument(
        "--tick-interval",
        type=finite_float(gt=0, le=60, unit="seconds"),
        default=None,
        help="seconds between ticks, > 0 and <= 60 (default: config)",
    )
    a.set_defaults(func=cmd_arbiter_start)
    a = asub.add_parser("stop", help="stop the arbiter and delete its persisted state")
    a.add_argument("--address", default=None)
    a.set_defaults(func=cmd_arbiter_stop)
    a = asub.add_parser(
        "reset",
        help="end the arbiter if it exists (without calling it) and delete its saved state and config, "
        "for a state that no longer parses or an actor that is wedged",
    )
    a.add_argument("--address", default=None)
    a.add_argument("--state-path", default=None, help="also delete this state file (arbiter.state_path)")
    a.set_defaults(func=cmd_arbiter_reset)

    for module_name in ("tidal.serving.cli", "tidal.training.cli", "tidal.cluster.sim.cli"):
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            if e.name and module_name.startswith(e.name):
                continue  # the package is not there: no subcommand
            # A broken optional subcommand must not take `tidal up`/`down` with it.
            logger.warning("`tidal` subcommands of %s are unavailable: %s", module_name, e)
            continue
        register = getattr(module, "register_cli", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

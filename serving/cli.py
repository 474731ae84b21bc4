"""``tidal serve ...``: deploy, promote, delete and inspect Tidal Serve applications.

``cluster/cli.py`` calls :func:`register_cli` with its subparsers; each subcommand sets ``func`` (takes the
parsed args, returns an exit code). The commands connect to the cluster in ``--address`` (default:
``$RAY_ADDRESS``, else ``auto``) as a Ray driver; with Ray 2.60 token auth, the cluster's auth variables
must be in the environment (``LocalCluster.env()`` / ``tidal up`` prints them).

Examples::

    tidal serve deploy serving/config.yaml --checkpoint /ckpts/digits/v1 --http-port 52080
    tidal serve promote /ckpts/digits/v2 --app digits
    tidal serve status
    tidal serve delete digits
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from tidal.cluster.flags import bounded_int, finite_float

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "config.yaml"


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` with its subcommands to a parent CLI's ``subparsers``."""
    serve_p = subparsers.add_parser("serve", help="Serve applications under Tidal (deploy, promote, ...)")
    sub = serve_p.add_subparsers(dest="serve_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or auto)")

    p = sub.add_parser(
        "deploy", help="deploy a Serve config file (like `serve deploy`, args validated first)"
    )
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="Serve config YAML")
    p.add_argument("--checkpoint", help="override model.checkpoint of every Tidal application")
    p.add_argument(
        "--http-port",
        type=bounded_int(ge=1, le=65535, unit="a port"),
        default=None,
        help="Serve's HTTP port (default: $TIDAL_SERVE_HTTP_PORT, else the local cluster's reserved port, "
        "else the config's)",
    )
    p.add_argument("--no-wait", action="store_true", help="return without waiting for RUNNING")
    common(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("promote", help="roll out a new checkpoint without dropping a request")
    p.add_argument("checkpoint", help="checkpoint directory (model.pt + manifest.json)")
    p.add_argument("--app", default=None, help="application name (default: the only Tidal application)")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"], default=None)
    p.add_argument("--timeout-s", type=finite_float(gt=0, unit="seconds"), default=120.0)
    p.add_argument("--no-wait", action="store_true")
    common(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("delete", help="delete an application and unregister it from the arbiter")
    p.add_argument("app", help="application name")
    common(p)
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("status", help="Tidal applications: version, replicas per GPU type")
    p.add_argument("--json", action="store_true")
    common(p)
    p.set_defaults(func=cmd_status)
    return serve_p


def _connect(address: str | None) -> None:
    """Connect as ``tidal`` does (the recorded local cluster with its auth, else ``$RAY_ADDRESS``)."""
    import ray

    if ray.is_initialized():
        return
    try:
        from tidal.cluster.connect import connect as tidal_connect
    except ImportError:
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
        return
    tidal_connect(address)


def _reserved_http_port(flag: int | None) -> int | None:
    """``--http-port``, else ``$TIDAL_SERVE_HTTP_PORT``, else the recorded local cluster's reserved port."""
    if flag is not None:
        return flag
    if os.environ.get("TIDAL_SERVE_HTTP_PORT"):
        return int(os.environ["TIDAL_SERVE_HTTP_PORT"])
    try:
        from tidal.cluster.connect import recorded_cluster

        cluster = recorded_cluster()
    except ImportError:
        return None
    return cluster.serve_http_port if cluster is not None and cluster.serve_http_port else None


def cmd_deploy(args: argparse.Namespace) -> int:
    from tidal.serving.rollout import RolloutError, deploy_config

    try:
        config = yaml.safe_load(Path(args.config).read_text())
    except (OSError, yaml.YAMLError) as e:
        print(f"error: cannot read {args.config}: {e}", file=sys.stderr)
        return 2
    if args.checkpoint:
        for app in config.get("applications", []):
            if app.get("import_path") == "tidal.serving.app:build_app":
                app.setdefault("args", {}).setdefault("model", {})["checkpoint"] = str(
                    Path(args.checkpoint).expanduser().resolve()
                )
    _connect(args.address)
    try:
        names = deploy_config(config, http_port=_reserved_http_port(args.http_port), wait=not args.no_wait)
    except RolloutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"deployed: {', '.join(names)}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from tidal.serving.rollout import RolloutError, promote_checkpoint

    _connect(args.address)
    try:
        r = promote_checkpoint(
            args.checkpoint,
            app_name=args.app,
            precision=args.precision,
            wait=not args.no_wait,
            timeout_s=args.timeout_s,
        )
    except RolloutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"promoted {r.checkpoint} (version {r.version}) on {r.app_name}/{r.deployment_name} "
        f"in {r.duration_s:.1f} s (was {r.previous_checkpoint})"
    )
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from tidal.serving.rollout import RolloutError, delete_app

    _connect(args.address)
    try:
        delete_app(args.app)
    except RolloutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"deleted {args.app}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tidal.serving.config import ServeAppArgs
    from tidal.serving.rollout import replicas_by_gpu_type, serve_details, tidal_apps

    _connect(args.address)
    details = serve_details()
    rows = []
    for name, cfg in tidal_apps(details).items():
        a = ServeAppArgs.model_validate(cfg.get("args", {}))
        dep_cfg = next((d for d in cfg.get("deployments", []) if d.get("name") == a.deployment_name), {})
        checkpoint = (dep_cfg.get("user_config") or {}).get("checkpoint", a.model.checkpoint)
        app = details.applications[name]
        rows.append(
            {
                "app": name,
                "status": str(app.status),
                "service": a.service.name,
                "checkpoint": checkpoint,
                "replicas_by_gpu_type": replicas_by_gpu_type(name, a.deployment_name),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(
                f"{r['app']}: {r['status']}, service {r['service']}, checkpoint {r['checkpoint']}, "
                f"replicas {r['replicas_by_gpu_type']}"
            )
        if not rows:
            print("no Tidal applications")
    return 0

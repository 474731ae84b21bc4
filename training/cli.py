"""``tidal train JOB.yaml``: validate a job spec here, then submit it as a Ray job.

It submits exactly what ``ray job submit --working-dir . -- python -m tidal.training.run JOB.yaml`` would, through
Ray's ``JobSubmissionClient``, with the project as working directory. A spec with a bad field, a model
that does not import, or a GPU type the cluster does not have is refused here, before anything is
submitted (exit code 2). Without ``--no-wait`` it follows the job's logs and exits with its outcome.

``register_cli(subparsers)`` adds the ``train`` subcommand to the ``tidal`` CLI (``tidal.cluster.cli``);
``python -m tidal.training.cli train JOB.yaml`` runs it on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tidal.training.run import EXIT_OK, EXIT_SPEC, EXIT_UNFINISHED, split_types
from tidal.training.spec import SpecError, load_spec

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SPEC_ENV_VAR = "TIDAL_JOB_SPEC_YAML_B64"
DRIVER_RESOURCE = "job_driver"  # cluster.yaml's driver nodes: where `ray job submit` drivers should run


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``train`` to a CLI's subparsers; the parsed args carry ``func`` (returns an exit code)."""
    p = subparsers.add_parser(
        "train",
        help="submit an elastic training job (a YAML spec under training/jobs/) to the cluster",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("job", help="job spec YAML, e.g. training/jobs/digits.yaml")
    p.add_argument(
        "--address",
        default=None,
        help="the cluster's dashboard URL (default: the `tidal up` cluster, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS"
        " as for `ray job submit`)",
    )
    p.add_argument(
        "--known-gpu-types",
        default=None,
        help="comma-separated GPU types to accept besides those the cluster's nodes report",
    )
    p.add_argument("--working-dir", default=str(PROJECT_ROOT), help="the job's working directory (default: the project)")
    p.add_argument("--standalone", action="store_true", help="run without the arbiter (see tidal.training.run)")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    p.add_argument("--submission-id", default=None, help="the Ray job submission id (default: generated)")
    p.set_defaults(func=cmd_train)
    return p


def cluster_nodes(address: str | None) -> list[Any] | None:
    """The cluster's alive nodes, read over the dashboard's HTTP state API (no Ray connection).

    Returns None when the cluster cannot be asked; the job's driver checks the GPU types again once it runs.
    """
    try:
        from ray.util.state import list_nodes

        nodes = list_nodes(address=address, detail=True, raise_on_missing_output=False)
    except Exception as e:  # an unreachable dashboard: the job's driver refuses an unknown type instead
        logger.warning("could not read the cluster's nodes (%s); the job's driver will check its GPU types", e)
        return None
    return [n for n in nodes if n.state == "ALIVE"]


def cluster_gpu_types(nodes: Sequence[Any]) -> set[str]:
    """The GPU types of ``nodes`` (their ``ray.io/accelerator-type`` labels)."""
    from tidal.cluster.model import GPU_TYPE_LABEL

    return {n.labels[GPU_TYPE_LABEL] for n in nodes if GPU_TYPE_LABEL in (n.labels or {})}


def entrypoint_resources(resources_per_node: Iterable[Mapping[str, float]] | None) -> dict[str, float] | None:
    """``{"job_driver": 1}`` when a node offers ``job_driver``, else None (the driver goes where Ray puts it).

    ``cluster.yaml``'s ``driver`` nodes carry ``job_driver`` so that job drivers run off the head (a head
    restart does not end them). A cluster without the resource gets no request for it: Ray would hold the
    driver until a node offering it appears, that is, for ever. An unknown cluster (``None``: its nodes
    could not be read) gets none either.
    """
    for resources in resources_per_node or ():
        if float(resources.get(DRIVER_RESOURCE, 0.0)) >= 1.0:
            return {DRIVER_RESOURCE: 1.0}
    return None


def build_entrypoint(job: Path, working_dir: Path, extra: Sequence[str]) -> tuple[str, dict[str, str]]:
    """The ``python -m tidal.training.run`` command line and the env vars it needs.

    A spec inside the working directory travels with it and is named by its relative path; one outside it
    is sent inline (base64 in an env var), so that the job does not depend on this machine's files.
    """
    args = " ".join(extra)
    try:
        rel = job.resolve().relative_to(working_dir.resolve())
        return f"python -m tidal.training.run {rel} {args}".strip(), {}
    except ValueError:
        encoded = base64.b64encode(job.read_bytes()).decode()
        return (
            f"python -m tidal.training.run {job.name} --spec-from-env {SPEC_ENV_VAR} {args}".strip(),
            {SPEC_ENV_VAR: encoded},
        )


def resolve_address(address: str | None) -> str | None:
    """``--address``, else the local cluster ``tidal up`` recorded (its auth settings activated), else None
    (``JobSubmissionClient`` then reads ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``, as ``ray job submit`` does)."""
    if address is not None:
        return address
    try:
        from tidal.cluster.connect import recorded_cluster
    except ImportError:
        return None
    cluster = recorded_cluster()
    if cluster is None or not cluster.pids():
        return None
    cluster.activate()
    return cluster.dashboard_url


def cmd_train(args: argparse.Namespace) -> int:
    job = Path(args.job)
    args.address = resolve_address(args.address)
    extra_types = split_types(args.known_gpu_types)
    try:
        spec = load_spec(job, check_imports=True)
    except SpecError as e:
        print(f"job spec refused (nothing submitted):\n{e}", file=sys.stderr)
        return EXIT_SPEC
    nodes = cluster_nodes(args.address)
    if nodes is not None:
        known = cluster_gpu_types(nodes)
        try:
            load_spec(job, known_gpu_types=known | set(extra_types))
        except SpecError as e:
            print(f"job spec refused (nothing submitted):\n{e}", file=sys.stderr)
            return EXIT_SPEC

    from ray.job_submission import JobStatus, JobSubmissionClient

    extra = []
    if args.known_gpu_types:
        extra.append(f"--known-gpu-types={','.join(extra_types)}")
    if args.standalone:
        extra.append("--standalone")
    working_dir = Path(args.working_dir)
    entrypoint, env_vars = build_entrypoint(job, working_dir, extra)
    client = JobSubmissionClient(args.address)
    submission_id = args.submission_id or f"tidal-train-{spec.name}-{uuid.uuid4().hex[:6]}"
    driver_resources = entrypoint_resources(
        None if nodes is None else [dict(n.resources_total or {}) for n in nodes]
    )
    client.submit_job(
        entrypoint=entrypoint,
        submission_id=submission_id,
        runtime_env={"working_dir": str(working_dir), "env_vars": env_vars},
        metadata={"tidal": "train", "job": spec.name},
        entrypoint_resources=driver_resources,
    )
    where = f" (driver on a node with {DRIVER_RESOURCE})" if driver_resources else ""
    print(f"submitted {spec.name} as Ray job {submission_id}{where}: {entrypoint}")
    if args.no_wait:
        return EXIT_OK

    async def tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            print(lines, end="")

    try:
        asyncio.run(tail())
    except Exception as e:  # the log stream can drop; the status below is what counts
        logger.warning("log stream ended: %s", e)
    status = client.get_job_status(submission_id)
    while not status.is_terminal():
        time.sleep(1.0)
        status = client.get_job_status(submission_id)
    print(f"job {submission_id}: {status}")
    return EXIT_OK if status == JobStatus.SUCCEEDED else EXIT_UNFINISHED


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tidal.training.cli")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())

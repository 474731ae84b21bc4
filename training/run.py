"""``python -m tidal.training.run JOB.yaml``: the driver of one elastic training job.

Started by ``ray job submit --working-dir . -- python -m tidal.training.run JOB.yaml`` (or ``tidal train``).
It refuses a bad spec before anything starts (exit code 2, every problem on stderr, field first), then
connects to the cluster, checks the GPU types against the cluster's inventory, and runs the job as one
``TidalTrainer`` around the built-in loop (``tidal.training.loop``): Tidal's own jobs are one more user of
``tidal.train``. At the end it exports the model (a finished job), writes ``<storage>/<name>/tidal/summary.json``
and prints the same summary as one line of JSON.

``ray job stop`` (SIGTERM to this driver) aborts the run as Ctrl-C on ``fit()`` does: the controller
unregisters the job and writes its ledger before it ends.

Exit codes: 0 the job finished (model exported), 1 it stopped unfinished or failed, 2 the spec was refused.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from tidal.training.spec import JobSpec, SpecError, load_spec

logger = logging.getLogger("tidal.training.run")

EXIT_OK, EXIT_UNFINISHED, EXIT_SPEC = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tidal.training.run", description=__doc__.splitlines()[0])
    p.add_argument("job", help="the job spec YAML (see training/jobs/)")
    p.add_argument("--address", default=None, help="Ray address (default: the cluster `ray job submit` runs in)")
    p.add_argument(
        "--known-gpu-types",
        default=None,
        help="comma-separated GPU types to accept besides those the cluster reports (e.g. types an autoscaler"
        " can add)",
    )
    p.add_argument(
        "--standalone",
        action="store_true",
        help="run without the arbiter: take the preferred GPU type's GPUs and never resize",
    )
    p.add_argument(
        "--spec-from-env",
        default=None,
        metavar="VAR",
        help="read the spec's YAML (base64) from this env var instead of the file (`tidal train` sends a spec"
        " that lies outside the working directory this way)",
    )
    p.add_argument("--validate-only", action="store_true", help="validate the spec (imports included) and exit")
    return p


def split_types(value: str | None) -> list[str]:
    return [t.strip() for t in (value or "").split(",") if t.strip()]


def validate(path: str, known_gpu_types: Sequence[str] | None, text: str | None = None) -> JobSpec:
    """The spec with its entrypoints imported and, when given, its GPU types checked."""
    return load_spec(path, known_gpu_types=known_gpu_types, check_imports=True, text=text)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra_types = split_types(args.known_gpu_types)
    text = None
    if args.spec_from_env:
        text = base64.b64decode(os.environ.get(args.spec_from_env, "")).decode()
    # 1. Everything that needs no cluster: fields, bounds, the model and data entrypoints.
    try:
        spec = validate(args.job, None, text)
    except SpecError as e:
        print(f"job spec refused:\n{e}", file=sys.stderr)
        return EXIT_SPEC
    if args.validate_only:
        if extra_types:
            try:
                validate(args.job, extra_types, text)
            except SpecError as e:
                print(f"job spec refused:\n{e}", file=sys.stderr)
                return EXIT_SPEC
        print(f"job spec {args.job} is valid: {spec.name}")
        return EXIT_OK

    import ray
    from tidal.training.trainer_policy import known_gpu_types
    from tidal.training.trainer_signal import NAMESPACE

    ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=True)
    try:
        arbiter_types: set[str] = set()
        if not args.standalone:
            from tidal.cluster.client import ArbiterClient

            grants = ArbiterClient()
            if not grants.available():
                print(
                    f"job {spec.name} failed: no arbiter on this cluster (start one with `tidal arbiter start`, or"
                    " run with --standalone)",
                    file=sys.stderr,
                )
                return EXIT_UNFINISHED
            arbiter_types = set(grants.status().get("capacity") or {})
        # 2. The GPU types, against the inventory (the arbiter's, every node's, and --known-gpu-types).
        known = sorted(arbiter_types | known_gpu_types() | set(extra_types))
        try:
            spec = validate(args.job, known, text)
        except SpecError as e:
            print(f"job spec refused:\n{e}", file=sys.stderr)
            return EXIT_SPEC
        from tidal.training.job import run_job

        _abort_on_sigterm()
        summary = run_job(spec, standalone=args.standalone)
        print(json.dumps({k: summary[k] for k in SUMMARY_KEYS}))
        return EXIT_OK if summary["finished"] else EXIT_UNFINISHED
    finally:
        ray.shutdown()


def _abort_on_sigterm() -> None:
    """``ray job stop`` sends SIGTERM (SIGKILL a few seconds later): abort the run as Ray Train's own Ctrl-C
    handler does (installed by ``fit()``), so that the controller unregisters the job and writes its ledger."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        logger.warning("signal %d: aborting the run", signum)
        sigint = signal.getsignal(signal.SIGINT)
        if callable(sigint) and sigint is not signal.default_int_handler:
            sigint(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


SUMMARY_KEYS = ("job", "finished", "final_step", "restarts", "steps_lost", "metrics", "reached_expected", "export_path")


if __name__ == "__main__":
    sys.exit(main())

"""The Ray-alone baseline of ``bench/spike.py``: a training job as a plain Ray Train elastic job, no arbiter.

Submitted like Tidal's jobs, with the same job spec::

    ray job submit --working-dir . -- python bench/spike_ray_alone_job.py JOB.yaml

It runs the *same* training (``tidal.training.loop.train_loop_per_worker``: same model, data, batch, checkpoints)
as one ``TorchTrainer`` with ``ScalingConfig(num_workers=(min_workers, max_workers))`` on the job's most
preferred GPU type (``label_selector``) and lets Ray Train size it: no arbiter, no yield, no resize by
anyone but Ray Train itself. ``FailureConfig(max_failures=-1)`` lets Ray Train restart the worker group
from the latest checkpoint as elastic jobs do.

The loop's rank 0 posts its progress to a ``tidal.training.signal.ProgressBoard`` actor named after the job
(Tidal's jobs report theirs to the arbiter), so that the benchmark reads the steps of both systems; nothing
ever asks this job to yield (``should_yield()`` is False outside a ``TidalTrainer``).
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import signal
import sys
from collections.abc import Sequence

logger = logging.getLogger("spike.ray_alone_job")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job", help="job spec YAML (training/jobs format)")
    p.add_argument("--spec-from-env", default=None, metavar="VAR", help="read the spec's YAML (base64) from this env var")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from tidal.training.spec import SpecError, load_spec

    text = base64.b64decode(os.environ[args.spec_from_env]).decode() if args.spec_from_env else None
    try:
        spec = load_spec(args.job, check_imports=True, text=text)
    except SpecError as e:
        print(f"job spec refused:\n{e}", file=sys.stderr)
        return 2

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from tidal.cluster.model import GPU_TYPE_LABEL
    from tidal.training.loop import train_loop_per_worker
    from tidal.training.signal import NAMESPACE, ProgressBoard, progress_board_name
    from tidal.training.trainer import AutoTorchConfig

    ray.init(namespace=NAMESPACE)
    board = ProgressBoard.options(name=progress_board_name(spec.name), namespace=NAMESPACE).remote(spec.name)
    ray.get(board.snapshot.remote())
    gpu_type = spec.gpu_types[0]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec.model_dump(mode="json", by_alias=True),
            "progress_board": progress_board_name(spec.name),
            "namespace": NAMESPACE,
        },
        torch_config=AutoTorchConfig(),
        scaling_config=ScalingConfig(
            num_workers=(spec.min_workers, spec.max_workers),
            use_gpu=True,
            resources_per_worker={"GPU": spec.gpus_per_worker, "CPU": spec.cpus_per_worker},
            label_selector={GPU_TYPE_LABEL: gpu_type},
        ),
        run_config=RunConfig(
            name=f"{spec.name}-ray-alone",
            storage_path=spec.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.num_checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=-1),
        ),
    )

    def on_sigterm(signum: int, frame: object) -> None:
        # `ray job stop` sends SIGTERM: end fit() the way Ctrl-C does (Ray Train aborts its run on it).
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    logger.info("job %s: plain Ray Train elastic job, %d-%d workers on %s", spec.name, spec.min_workers, spec.max_workers, gpu_type)
    try:
        result = trainer.fit()
        logger.info("job %s finished: %s", spec.name, result.metrics)
        return 0
    except KeyboardInterrupt:
        logger.info("job %s stopped", spec.name)
        return 1
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())

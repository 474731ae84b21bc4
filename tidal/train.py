"""Bring your Ray Train script under Tidal: ``TidalTrainer`` is ``ray.train.torch.TorchTrainer`` sized by the arbiter.

The lines a ``TorchTrainer`` script adds::

    import tidal.train

    trainer = tidal.train.TidalTrainer(
        train_func,
        scaling_config=ScalingConfig(num_workers=(2, 4), use_gpu=True),
        run_config=RunConfig(name="my-run", storage_path="/mnt/shared/ray"),
        tidal=tidal.train.TidalConfig(gpu_types=["H100", "A100"], priority=10),
    )

    def train_func(config):
        ...  # resume from ray.train.get_checkpoint() as usual
        for step in ...:
            ...
            if tidal.train.should_yield():           # the same answer on every rank
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir))
                return                               # the run goes on at its new size from this checkpoint

One Ray Train controller runs the job for its whole life; a grant change restarts only its worker group. A
loop that never calls ``should_yield()`` is stopped by force ``yield_grace_s`` after a shrink and resumes from
its last reported checkpoint. With no arbiter, the trainer runs as ``TorchTrainer`` would at ``max`` workers.

A Hugging Face Transformers ``Trainer`` in the train function: add ``tidal.train.TransformersCallback()`` to its
callbacks next to Ray's ``RayTrainReportCallback`` (``tidal.training.transformers_callback``; imported only when
asked for, so that Transformers stays optional).
"""

from __future__ import annotations

from tidal.training.trainer import TidalTrainer, should_yield, stop
from tidal.training.trainer_config import TidalConfig, TidalConfigError

# TransformersCallback is provided by __getattr__ below (imported on first use: Transformers is optional).
__all__ = ["TidalConfig", "TidalConfigError", "TidalTrainer", "TransformersCallback", "should_yield", "stop"]  # noqa: F822


def __getattr__(name: str) -> object:
    if name == "TransformersCallback":
        from tidal.training.transformers_callback import TransformersCallback

        return TransformersCallback
    raise AttributeError(f"module 'tidal.train' has no attribute {name!r}")

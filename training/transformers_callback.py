"""``TransformersCallback``: a Hugging Face Transformers ``Trainer`` inside a ``TidalTrainer``'s train function.

Add it next to Ray's ``RayTrainReportCallback``, which reports every checkpoint the ``Trainer`` saves::

    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                   callbacks=[RayTrainReportCallback(), tidal.train.TransformersCallback()])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            trainer.train(resume_from_checkpoint=os.path.join(d, RayTrainReportCallback.CHECKPOINT_NAME))
    else:
        trainer.train()

At every step's end it asks ``tidal.train.should_yield()`` (the same answer on every rank: every rank runs the
callbacks at the same step). On True it asks the ``Trainer`` to save now and to stop: the save goes through
``RayTrainReportCallback.on_save`` (a checkpoint reported on every rank), ``train()`` returns, the train function
returns, and the run goes on at its new size from that checkpoint (``resume_from_checkpoint`` restores the
model, optimizer, scheduler, RNG states and the step, and skips the batches already seen).

Transformers is not one of Tidal's dependencies: this module imports it, so ``tidal.train`` imports this module
only when ``TransformersCallback`` is asked for.
"""

from __future__ import annotations

from typing import Any

from tidal.training.trainer import should_yield
from transformers import TrainerCallback


class TransformersCallback(TrainerCallback):
    """Saves and stops the ``Trainer`` at the step boundary where the arbiter resized the job. See the module
    docstring. ``yielded`` says whether it did (the ``Trainer`` stopped for a resize, not at its end)."""

    def __init__(self) -> None:
        self.yielded = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step < state.max_steps and should_yield():
            self.yielded = True
            control.should_save = True
            control.should_training_stop = True
        return control

"""``tidal.train.TransformersCallback`` against the Trainer's own state and control objects (no Ray, no Trainer)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers", reason="Transformers is in the test extra (pip install -e .[test])")


def test_a_yield_asks_the_trainer_to_save_and_stop_at_this_step_and_nothing_else_does(monkeypatch):
    import tidal.training.transformers_callback as cb

    import tidal.train

    answers = iter([False, True])
    monkeypatch.setattr(cb, "should_yield", lambda: next(answers))
    callback = tidal.train.TransformersCallback()
    state = transformers.TrainerState(global_step=10, max_steps=60)
    control = transformers.TrainerControl()
    callback.on_step_end(None, state, control)
    assert not (control.should_save or control.should_training_stop or callback.yielded)
    callback.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop and callback.yielded


def test_the_last_step_is_the_trainers_own_end_not_a_yield(monkeypatch):
    import tidal.training.transformers_callback as cb

    asked = []
    monkeypatch.setattr(cb, "should_yield", lambda: asked.append(1) or True)
    callback = cb.TransformersCallback()
    control = transformers.TrainerControl()
    callback.on_step_end(None, transformers.TrainerState(global_step=60, max_steps=60), control)
    assert not control.should_training_stop and not callback.yielded and not asked

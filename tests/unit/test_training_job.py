"""A job spec as a ``TidalTrainer`` (``tidal.training.job``), without a cluster: the mapping of its fields onto
Ray Train's configs and ``TidalConfig``, and the stated-metrics check."""

from __future__ import annotations

from tidal.training.job import metric_reached, trainer_configs
from tidal.training.spec import load_spec
from tidal.training.trainer import AutoTorchConfig


def test_a_loss_must_be_at_most_its_threshold_and_anything_else_at_least():
    assert metric_reached("test_loss", 1.9, 2.0)
    assert not metric_reached("test_loss", 2.1, 2.0)
    assert metric_reached("test_accuracy", 0.96, 0.95)
    assert not metric_reached("test_accuracy", 0.94, 0.95)
    assert not metric_reached("test_accuracy", None, 0.95)


def test_a_job_spec_maps_onto_the_trainers_scaling_run_and_tidal_configs(tmp_path):
    spec = load_spec("training/jobs/digits.yaml").model_copy(
        update={"storage_path": str(tmp_path), "spare_workers": 2, "max_failures": 5, "health_check_interval_s": 1.0}
    )
    c = trainer_configs(spec)
    assert c["scaling_config"].num_workers == (1, 4) and c["scaling_config"].use_gpu
    assert c["scaling_config"].resources_per_worker == {"GPU": 1.0, "CPU": 1.0}
    assert (c["run_config"].name, c["run_config"].storage_path) == ("digits", str(tmp_path))
    assert c["run_config"].checkpoint_config.num_to_keep == spec.num_checkpoints_to_keep
    assert c["run_config"].failure_config.max_failures == 5
    t = c["tidal"]
    assert (t.name, t.gpu_types, t.priority, t.preemptible) == ("digits", ["H100", "A100", "RTX4090"], 10, True)
    assert (t.yield_grace_s, t.resize_min_interval_s, t.controller_poll_s, t.spare_workers) == (20, 20, 1.0, 2)
    assert not t.standalone and trainer_configs(spec, standalone=True)["tidal"].standalone
    assert isinstance(c["torch_config"], AutoTorchConfig)
    assert trainer_configs(spec.model_copy(update={"backend": "gloo"}))["torch_config"].backend == "gloo"
    assert c["train_loop_config"]["spec"]["name"] == "digits"

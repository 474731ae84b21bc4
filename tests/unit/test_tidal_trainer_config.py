"""``tidal.train``: a bad ``TidalConfig`` or a scaling config the trainer cannot size is refused where it is
written, naming the field, the value and what is valid, before Ray is even started."""

from __future__ import annotations

import pytest
import ray
from ray.train import ScalingConfig
from tidal.training.trainer_config import job_name, worker_bounds

import tidal.train


def loop(config):
    pass


def test_a_bad_tidal_config_is_refused_naming_each_field_its_value_and_what_is_valid():
    with pytest.raises(tidal.train.TidalConfigError) as e:
        tidal.train.TidalConfig(gpu_types=["H100", "H100"], yield_grace_s=-1, priorty=5)
    msg = str(e.value)
    assert "gpu_types: GPU types repeat: ['H100', 'H100']; list each once" in msg
    assert "yield_grace_s: Input should be greater than 0 (got -1)" in msg
    assert "priorty: unknown field" in msg
    with pytest.raises(
        tidal.train.TidalConfigError, match=r"gpu_types: GPU type 'H 100' is not a label value"
    ):
        tidal.train.TidalConfig(gpu_types=["H 100"])
    with pytest.raises(tidal.train.TidalConfigError, match=r"gpu_types: List should have at least 1 item"):
        tidal.train.TidalConfig(gpu_types=[])


def test_the_trainer_refuses_what_it_cannot_size_before_ray_starts(monkeypatch):
    # (Not ray.is_initialized(): in the whole suite the session's driver is connected before this runs.)
    started = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append((a, k)))
    cfg = tidal.train.TidalConfig(gpu_types=["H100"])
    with pytest.raises(tidal.train.TidalConfigError, match=r"use_gpu: TidalTrainer sizes GPU workers"):
        tidal.train.TidalTrainer(loop, scaling_config=ScalingConfig(num_workers=2), tidal=cfg)
    with pytest.raises(
        tidal.train.TidalConfigError, match=r"tidal: expected a TidalConfig \(got \{'gpu_types'"
    ):
        tidal.train.TidalTrainer(
            loop, scaling_config=ScalingConfig(num_workers=2, use_gpu=True), tidal={"gpu_types": ["H100"]}
        )
    assert started == []


def test_worker_bounds_and_job_names():
    assert worker_bounds(4) == (4, 4) and worker_bounds((2, 4)) == (2, 4)
    for bad in ((4, 2), (0, 2), 2.5, (1, 2, 3), True):
        with pytest.raises(tidal.train.TidalConfigError, match="num_workers"):
            worker_bounds(bad)
    cfg = tidal.train.TidalConfig(gpu_types=["H100"])
    assert job_name(cfg, "My Run.v2", "ab12") == "my-run-v2"
    assert job_name(cfg, None, "ab12") == "train-ab12"
    assert job_name(tidal.train.TidalConfig(gpu_types=["H100"], name="mine"), "x", "ab12") == "mine"


def test_a_trainer_with_good_configs_takes_its_bounds_and_gpus_from_the_scaling_config():
    t = tidal.train.TidalTrainer(
        loop,
        scaling_config=ScalingConfig(num_workers=(2, 4), use_gpu=True, resources_per_worker={"GPU": 2}),
        tidal=tidal.train.TidalConfig(gpu_types=["H100", "A100"], name="job-a"),
    )
    assert (t.min_workers, t.max_workers, t.gpus_per_worker, t.job_name) == (2, 4, 2.0, "job-a")


def test_should_yield_outside_a_tidal_trainer_is_false():
    assert tidal.train.should_yield() is False


def test_a_run_without_datasets_starts_no_dataset_manager_and_a_shard_asked_for_is_a_clear_key_error():
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from tidal.training.trainer import _DatasetsCallback, _lean_callbacks

    t = tidal.train.TidalTrainer(
        loop, scaling_config=ScalingConfig(num_workers=2, use_gpu=True), tidal=tidal.train.TidalConfig(gpu_types=["H100"])
    )
    ray_default = t._create_default_callbacks()
    lean = _lean_callbacks(ray_default, t.train_run_context, t.datasets)
    assert sum(type(cb) is DatasetsCallback for cb in ray_default) == 1
    assert [type(cb) for cb in lean].count(_DatasetsCallback) == 1 and DatasetsCallback not in map(type, lean)
    (datasets_cb,) = [cb for cb in lean if isinstance(cb, _DatasetsCallback)]
    # Ray's own would start a DatasetManager actor here and hand out RayDatasetShardProviders.
    providers = datasets_cb.before_init_train_context([object(), object()])["dataset_shard_provider"]
    assert len(providers) == 2 and {type(p).__name__ for p in providers} == {"_NoDatasets"}
    with pytest.raises(KeyError, match="'train' not found: this run was given no datasets"):
        providers[0].get_dataset_shard(type("Info", (), {"dataset_name": "train"})())

"""The training job spec refuses bad jobs before anything starts, naming the field, the value and what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest
from tidal.cluster.model import TrainingJobSpec
from tidal.training.spec import JobSpec, SpecError, load_spec, parse_spec

JOBS = Path(__file__).resolve().parents[2] / "training" / "jobs"


def make_spec(**overrides) -> dict:
    spec = {
        "name": "digits-test",
        "model": {"class": "tidal.training.models:DigitsMLP", "kwargs": {"hidden": 32}},
        "data": {"factory": "tidal.training.data:digits"},
        "gpu_types": ["H100", "A100"],
        "min_workers": 1,
        "max_workers": 4,
        "global_batch_size": 64,
        "steps": 20,
        "storage_path": "/tmp/tidal-tr-spec",
    }
    spec.update(overrides)
    return spec


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_job_validates_with_its_model_and_data_imported(path: Path):
    spec = load_spec(path, check_imports=True)
    assert spec.min_workers <= spec.max_workers
    assert spec.expected_metrics, "an example job states the result it reaches"


def test_min_workers_above_max_workers_is_refused_naming_both_values():
    with pytest.raises(SpecError) as e:
        parse_spec(make_spec(min_workers=5, max_workers=4))
    assert "max_workers: min_workers=5 is above max_workers=4" in str(e.value)
    assert "min_workers <= max_workers" in str(e.value)


def test_unknown_gpu_type_is_refused_naming_the_types_the_cluster_has():
    with pytest.raises(SpecError) as e:
        parse_spec(make_spec(gpu_types=["H100", "V100"]), known_gpu_types=["H100", "A100", "RTX4090"])
    msg = str(e.value)
    assert msg.startswith("<spec>: gpu_types: 'V100' is not a GPU type of this cluster")
    assert "valid: A100, H100, RTX4090" in msg


def test_gpu_types_are_not_checked_without_an_inventory():
    assert parse_spec(make_spec(gpu_types=["B200"])).gpu_types == ["B200"]


def test_a_gpu_type_listed_twice_is_refused():
    with pytest.raises(SpecError, match="'H100' is listed twice"):
        parse_spec(make_spec(gpu_types=["H100", "H100"]))


def test_a_model_whose_module_does_not_import_is_refused_naming_the_module():
    with pytest.raises(SpecError) as e:
        parse_spec(make_spec(model={"class": "tidal.training.no_such_module:Net"}), check_imports=True)
    msg = str(e.value)
    assert "model.class: 'tidal.training.no_such_module:Net' does not import" in msg
    assert "No module named 'tidal.training.no_such_module'" in msg


def test_a_model_missing_from_its_module_is_refused_naming_what_the_module_has():
    with pytest.raises(SpecError) as e:
        parse_spec(make_spec(model={"class": "tidal.training.models:NoSuchNet"}), check_imports=True)
    msg = str(e.value)
    assert "has no attribute 'NoSuchNet'" in msg
    assert "DigitsMLP" in msg


def test_a_model_that_is_not_a_class_is_refused():
    with pytest.raises(SpecError, match="not a class"):
        parse_spec(make_spec(model={"class": "tidal.training.data:digits"}), check_imports=True)


def test_an_entrypoint_without_a_colon_is_refused_with_an_example():
    with pytest.raises(SpecError) as e:
        parse_spec(make_spec(data={"factory": "tidal.training.data.digits"}))
    assert "data.factory must be 'module:attr'" in str(e.value)


def test_an_unknown_field_is_refused_by_name():
    with pytest.raises(SpecError) as e:
        parse_spec(make_spec(max_worker=3))
    assert "max_worker: unknown field" in str(e.value)


def test_a_missing_field_is_named():
    spec = make_spec()
    del spec["global_batch_size"]
    with pytest.raises(SpecError, match="global_batch_size: required field is missing"):
        parse_spec(spec)


def test_a_bad_value_is_shown_with_the_field():
    with pytest.raises(SpecError) as e:
        parse_spec(make_spec(max_workers=0))
    assert "max_workers: Input should be greater than or equal to 1 (got 0)" in str(e.value)


def test_steps_and_epochs_are_exclusive():
    with pytest.raises(SpecError, match="steps, epochs: give exactly one of them"):
        parse_spec(make_spec(epochs=2.0))


def test_a_relative_storage_path_is_refused_because_the_job_runs_in_a_copy_of_the_project():
    with pytest.raises(SpecError, match="storage_path 'ckpts' is a relative path"):
        parse_spec(make_spec(storage_path="ckpts"))


def test_a_storage_uri_is_accepted_as_is():
    assert parse_spec(make_spec(storage_path="s3://bucket/tidal")).storage_path == "s3://bucket/tidal"


def test_a_global_batch_smaller_than_the_largest_size_is_refused():
    with pytest.raises(SpecError, match="global_batch_size=3 is below max_workers=4"):
        parse_spec(make_spec(global_batch_size=3))


def test_every_problem_is_reported_at_once():
    with pytest.raises(SpecError) as e:
        parse_spec(make_spec(name="Bad Name", lr=-1))
    assert len(e.value.problems) == 2


def test_a_missing_file_and_a_non_mapping_are_refused(tmp_path: Path):
    with pytest.raises(SpecError, match="job spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(bad)


def test_the_spec_becomes_the_arbiters_training_job_spec():
    spec = parse_spec(make_spec(min_workers=2, priority=30, preemptible=False, yield_grace_s=12, checkpoint_period_s=40))
    tjs = spec.to_training_job_spec()
    assert tjs == TrainingJobSpec(
        name="digits-test", gpus_per_worker=1.0, min_workers=2, max_workers=4, gpu_types=("H100", "A100"),
        priority=30, preemptible=False, weight=1.0, checkpoint_period_s=40.0, yield_grace_s=12.0,
    )  # fmt: skip


def test_epochs_become_steps_rounded_up():
    spec = parse_spec(make_spec(steps=None, epochs=2.0))
    assert spec.total_steps(num_samples=1437) == 45  # ceil(2 * 1437 / 64)


def test_the_spec_round_trips_through_the_json_the_workers_get():
    spec = parse_spec(make_spec())
    assert JobSpec.model_validate(spec.model_dump(mode="json", by_alias=True)) == spec

"""The checkpoint format shared by training and serving: atomic writes, clear errors on bad checkpoints."""

import json

import pytest
import torch
from tidal.serving.manifest import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    ModelManifest,
    check_model_class_allowed,
    load_manifest,
    load_model,
    write_model_checkpoint,
)
from tidal.training.models import DigitsMLP


def write(model, path, **overrides):
    kw = dict(
        model_class="tidal.training.models:DigitsMLP",
        model_kwargs={"hidden": 16},
        version="v1",
        input_shape=[64],
    )
    kw.update(overrides)
    return write_model_checkpoint(model, path, **kw)


def test_a_written_checkpoint_loads_back_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = DigitsMLP(hidden=16)
    path = write(model, tmp_path / "ck", labels=[str(i) for i in range(10)], metrics={"loss": 0.5})
    loaded = load_model(path, "cpu")
    x = torch.randn(5, 64)
    assert torch.equal(model(x), loaded(x))
    assert not loaded.training
    m = load_manifest(path)
    assert (m.version, m.input_shape, m.labels[3], m.metrics, m.framework) == (
        "v1",
        [64],
        "3",
        {"loss": 0.5},
        "torch",
    )


def test_rewriting_a_checkpoint_replaces_it_whole_and_leaves_no_temporary_directories(tmp_path):
    write(DigitsMLP(hidden=16), tmp_path / "ck", version="v1")
    write(DigitsMLP(hidden=16), tmp_path / "ck", version="v2")
    assert load_manifest(tmp_path / "ck").version == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    write(DigitsMLP(hidden=16), tmp_path / "ck", version="v1")
    with pytest.raises(CheckpointError, match="model_class"):
        write(DigitsMLP(hidden=16), tmp_path / "ck", version="v2", model_class="no_colon_here")
    assert load_manifest(tmp_path / "ck").version == "v1"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_class", "tidal.training.models", "module:attr"),
        ("input_shape", [], "input_shape"),
        ("input_shape", [64, 0], "positive"),
        ("version", "", "version"),
    ],
)
def test_invalid_manifest_fields_are_refused_naming_the_field(tmp_path, field, value, message):
    with pytest.raises(CheckpointError, match=message):
        write(DigitsMLP(hidden=16), tmp_path / "ck", **{field: value})


def test_a_missing_directory_or_manifest_says_which(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"has no {MANIFEST_FILE}"):
        load_manifest(tmp_path / "empty")


def test_a_manifest_that_is_not_json_or_not_valid_is_refused(tmp_path):
    path = write(DigitsMLP(hidden=16), tmp_path / "ck")
    (path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_manifest(path)
    raw = json.loads(ModelManifest(model_class="a:b", version="v", input_shape=[1]).model_dump_json())
    raw["framework"] = "jax"
    (path / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="framework"):
        load_manifest(path)


def test_missing_weights_an_unimportable_class_or_wrong_kwargs_are_clear_errors(tmp_path):
    path = write(DigitsMLP(hidden=16), tmp_path / "ck")
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"has no {WEIGHTS_FILE}"):
        load_model(path)
    path = write(DigitsMLP(hidden=16), tmp_path / "ck2", model_class="tidal.training.models:NoSuchModel")
    with pytest.raises(CheckpointError, match="no attribute 'NoSuchModel'"):
        load_model(path)
    path = write(DigitsMLP(hidden=16), tmp_path / "ck3", model_kwargs={"hidden": 32})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)


def test_a_model_class_from_a_module_the_operator_did_not_allow_is_refused_before_it_is_imported(tmp_path):
    path = write(DigitsMLP(hidden=16), tmp_path / "ck", model_class="tidal_untrusted_module_xyz:Model")
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    message = str(e.value)
    assert "'tidal_untrusted_module_xyz:Model'" in message and "not an allowed model module" in message
    assert "args.allowed_model_modules" in message
    # Allowed, it is imported (and fails as a missing module would), so the check came first.
    with pytest.raises(CheckpointError, match="cannot import module"):
        load_model(path, allowed_modules=["tidal_untrusted_module_xyz"])


@pytest.mark.parametrize(
    ("spec", "allowed"),
    [
        ("tidal.training.models:DigitsMLP", True),
        ("tidal.training.models_evil:X", False),  # a prefix of the name is not a package above it
        ("tidal.training:DigitsMLP", False),
        ("os:system", False),
        ("mypkg.nets.resnet:ResNet", True),
    ],
)
def test_a_module_is_allowed_when_listed_or_inside_a_listed_package(spec, allowed):
    modules = ["tidal.training.models", "mypkg"]
    if allowed:
        check_model_class_allowed(spec, modules)
    else:
        with pytest.raises(CheckpointError, match="not an allowed model module"):
            check_model_class_allowed(spec, modules)


def test_weights_that_are_more_than_tensors_are_refused_not_run(tmp_path):
    path = write(DigitsMLP(hidden=16), tmp_path / "ck")
    torch.save({"fc": DigitsMLP(hidden=16)}, path / WEIGHTS_FILE)  # a pickled module, not a state_dict
    with pytest.raises(CheckpointError, match="more than tensors"):
        load_model(path)

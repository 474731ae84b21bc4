"""The model server's contract with its clients: the documented body is what the server accepts, any number is
accepted or refused with a 4xx naming its field, and non-finite outputs are reported, never sent as null."""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from tidal.serving.inference import LoadedModel, to_response
from tidal.serving.manifest import ModelManifest
from tidal.serving.schemas import (
    InputError,
    document_openapi,
    error_responses,
    flatten_instances,
    parse_predict_body,
    parse_predict_json,
    predict_request_model,
)

SHAPE = [3]
MAX_INSTANCES = 4
MAX_ABS = 1e6


def check(body: bytes) -> list[float]:
    """What the server does with a body before the model runs."""
    instances = parse_predict_body(parse_predict_json(body), MAX_INSTANCES)
    return flatten_instances(instances, SHAPE, MAX_ABS)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (b'{"instances": [[' + b"9" * 5000 + b", 0, 0]]}", "instances[0][0]", "got inf"),
        (b'{"instances": [[0, -' + b"9" * 400 + b", 0]]}", "instances[0][1]", "got -inf"),
        (b'{"instances": [[0, 0, 1e400]]}', "instances[0][2]", "finite"),
        (b'{"instances": [[NaN, 0, 0]]}', "instances[0][0]", "got nan"),
        (b'{"instances": [[0, Infinity, 0]]}', "instances[0][1]", "got inf"),
        (b'{"instances": [[-1e308, 0, 0]]}', "instances[0][0]", "from -1e+06 to 1e+06, got -1e+308"),
        (b'{"instances": [[0, 0, 1000001]]}', "instances[0][2]", "got 1e+06"),
        (b'{"instances": [[0, 0, 12345678901234567890123]]}', "instances[0][2]", "got 1.23457e+22"),
        (b'{"instances": ' + b"9" * 5000 + b"}", "instances", "expected a list"),
    ],
)
def test_any_number_a_client_sends_is_refused_with_a_422_naming_its_field_or_accepted(body, field, message):
    with pytest.raises(InputError) as e:
        check(body)
    assert (e.value.field, e.value.status) == (field, 422)
    assert message in e.value.message
    assert len(e.value.message) < 200


def test_numbers_within_the_bound_are_accepted_as_floats():
    assert check(b'{"instances": [[1000000, -1e6, 0.5]]}') == [1e6, -1e6, 0.5]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000, "nested too deeply"),
    ],
)
def test_a_body_that_is_not_json_is_a_400(body, message):
    with pytest.raises(InputError) as e:
        parse_predict_json(body)
    assert (e.value.field, e.value.status) == ("body", 400)
    assert message in e.value.message


def test_the_documented_body_is_the_served_models_shape_and_the_applications_limits():
    schema = predict_request_model([2, 3], max_instances=4, max_abs_input=10).model_json_schema()
    instances = schema["properties"]["instances"]
    assert schema["required"] == ["instances"] and schema["additionalProperties"] is False
    assert (instances["minItems"], instances["maxItems"]) == (1, 4)
    row = instances["items"]
    assert (row["minItems"], row["maxItems"], row["items"]["minItems"], row["items"]["maxItems"]) == (
        2,
        2,
        3,
        3,
    )
    assert row["items"]["items"] == {"type": "number", "minimum": -10, "maximum": 10}


JSON_NUMBERS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e6, -1e6, 1e6 + 1, 0.0]),
)
LEAVES = st.one_of(JSON_NUMBERS, st.booleans(), st.none(), st.text(max_size=3))
INSTANCES = st.lists(
    st.one_of(
        st.lists(LEAVES, min_size=2, max_size=4), LEAVES, st.lists(st.lists(LEAVES, max_size=3), max_size=3)
    ),
    max_size=MAX_INSTANCES + 1,
)


@given(INSTANCES)
def test_the_server_accepts_exactly_the_bodies_its_documented_model_accepts(instances):
    body = json.dumps({"instances": instances}).encode()  # NaN and Infinity as Python writes them
    model = predict_request_model(SHAPE, max_instances=MAX_INSTANCES, max_abs_input=MAX_ABS)
    try:
        flat = check(body)
    except InputError as e:
        assert e.status in (413, 422) and e.field.startswith("instances")
        with pytest.raises(ValidationError):
            model.model_validate_json(body)
    else:
        assert all(math.isfinite(x) and abs(x) <= MAX_ABS for x in flat)
        model.model_validate(json.loads(body))


def test_the_openapi_document_names_the_body_and_requires_the_key_everywhere_but_health():
    spec = {
        "paths": {
            "/healthz": {"get": {"responses": {}}},
            "/v1/predict": {"post": {"responses": error_responses(422)}},
        }
    }
    model = predict_request_model(SHAPE, max_instances=MAX_INSTANCES, max_abs_input=MAX_ABS)
    doc = document_openapi(spec, model, api_key_required=True, public_paths=["/healthz"])
    body = doc["paths"]["/v1/predict"]["post"]["requestBody"]
    assert body["required"] and body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictRequest"
    }
    assert (
        doc["components"]["schemas"]["PredictRequest"]["properties"]["instances"]["maxItems"] == MAX_INSTANCES
    )
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert doc["paths"]["/v1/predict"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]
    assert "requestBody" not in spec["paths"]["/v1/predict"]["post"]  # the input is left as it was
    open_doc = document_openapi(spec, model, api_key_required=False, public_paths=["/healthz"])
    assert "securitySchemes" not in open_doc["components"]


def loaded_model() -> LoadedModel:
    manifest = ModelManifest(model_class="tidal.training.models:DigitsMLP", version="v1", input_shape=[2])
    return LoadedModel(torch.nn.Identity(), manifest, None, torch.device("cpu"), torch.float32, 0.0)


def test_non_finite_outputs_are_reported_naming_the_instance_never_returned_as_null():
    with pytest.raises(InputError) as e:
        to_response(loaded_model(), torch.tensor([[1.0, 2.0], [math.inf, 0.0], [math.nan, 1.0]]))
    assert (e.value.field, e.value.status) == ("instances[1]", 422)
    assert "not finite" in e.value.message
    assert to_response(loaded_model(), torch.tensor([[1.0, 2.0]]))["outputs"] == [[1.0, 2.0]]

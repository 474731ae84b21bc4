"""Fixtures shared by the serving integration tests: the default model's checkpoints, trained once."""

import pytest

from serving.examples import train_digits_checkpoint


@pytest.fixture(scope="session")
def digits_checkpoints(tmp_path_factory):
    """Two versions of the default model (DigitsMLP on scikit-learn's digits), a few epochs each."""
    root = tmp_path_factory.mktemp("digits-ckpts")
    return {
        "v1": train_digits_checkpoint(root / "v1", version="digits-v1", epochs=3),
        "v2": train_digits_checkpoint(root / "v2", version="digits-v2", epochs=2, seed=1),
    }

"""Fixtures shared by the serving integration tests: the default model's checkpoints, trained once."""

import pytest
from tidal.training.digits_checkpoint import train_digits_checkpoint


@pytest.fixture(scope="session")
def digits_checkpoints(tmp_path_factory):
    """Two versions of the default model (DigitsMLP on scikit-learn's digits), a few epochs each."""
    root = tmp_path_factory.mktemp("digits-ckpts")
    return {
        "v1": train_digits_checkpoint(root / "v1", version="digits-v1", epochs=3),
        "v2": train_digits_checkpoint(root / "v2", version="digits-v2", epochs=2, seed=1),
    }


@pytest.fixture(scope="session")
def serve_instance(ray_driver, local_cluster):
    """Serve on the session cluster, its proxy on the port the cluster reserved; shut down at the end.

    Modules deploy their own applications (a deploy replaces the set of applications, as ``serve
    deploy`` does) and delete them when done; Serve itself starts once.
    """
    from ray import serve

    serve.start(
        proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": local_cluster.serve_http_port}
    )
    yield f"http://127.0.0.1:{local_cluster.serve_http_port}"
    serve.shutdown()

"""Shared fixtures: the session's local heterogeneous Ray cluster, a connected driver, and ``wait_for``.

``local_cluster`` starts once per test session, and only if a test asks for it: a Ray head plus one raylet
per node of ``cluster/configs/local.yaml`` (4x H100, 2x A100, 2x RTX4090, logical GPUs), on ports and temp
dirs of its own, so that other sessions on this machine are not disturbed. It is stopped, with every process
it started, at the end of the session.

Usage in a test module (``tidal_testing`` is a plain module in tests/, importable from every test)::

    from tidal_testing import wait_for

    pytestmark = pytest.mark.integration

    def test_something(ray_driver, local_cluster):
        ...  # this process is connected to local_cluster; local_cluster.env() for subprocess CLIs
        wait_for(lambda: predicate(), timeout_s=10, message="what we waited for")
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings

# Re-exported for `from conftest import wait_for`; prefer `from tidal_testing import wait_for`, which a
# conftest.py in a sub-directory (tests/serving_ray/ has one) cannot shadow.
from tidal_testing import wait_for

logger = logging.getLogger(__name__)

# No per-example deadline: it is a timed assertion, and a property test on a busy machine (the suite's
# Ray clusters share two cores) can take longer than the 200 ms default without anything being wrong.
settings.register_profile("tidal", deadline=None)
settings.load_profile("tidal")


@pytest.fixture(name="wait_for")
def _wait_for_fixture() -> Callable[..., Any]:
    """``wait_for`` as a fixture, for tests that prefer not to import from conftest."""
    return wait_for


@pytest.fixture(scope="session", autouse=True)
def tidal_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private TIDAL_HOME for the session, so that no test reads or writes the user's ~/.tidal."""
    home = str(tmp_path_factory.mktemp("tidal-home"))
    old = os.environ.get("TIDAL_HOME")
    os.environ["TIDAL_HOME"] = home
    yield home
    if old is None:
        os.environ.pop("TIDAL_HOME", None)
    else:
        os.environ["TIDAL_HOME"] = old


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[Any]:
    """The default local cluster (``cluster/configs/local.yaml``), started once per session.

    Its auth settings are active in this process (``LocalCluster.activate``); ``local_cluster.env()`` is the
    environment for Ray's CLIs (``ray job submit``, ``serve deploy``, ``ray status``) against it, and
    ``local_cluster.serve_http_port`` the port reserved for Serve's HTTP proxy.
    """
    from tidal.cluster.cluster_spec import load_cluster_spec
    from tidal.cluster.local import LocalCluster

    cluster = LocalCluster(load_cluster_spec())
    cluster.start()
    cluster.activate()
    logger.info("session cluster up in %.1f s at %s", cluster.startup_s, cluster.address)
    try:
        yield cluster
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            cluster.stop()
            cluster.cleanup()


@pytest.fixture(scope="session")
def ray_driver(local_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """This test process connected to ``local_cluster`` as a Ray driver (``ray.init``), for the session.

    ``ray.init`` puts the driver's working directory on the ``sys.path`` of every worker of its job (Serve's
    controller and replicas included, when the driver starts Serve). The suite runs from a Tidal checkout,
    whose top-level ``training/`` and ``serving/`` folders would then shadow a user application's packages
    of the same names: the driver connects from an empty folder of its own, as a user's driver would from
    their own repository.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    local_cluster.activate()
    with contextlib.chdir(tmp_path_factory.mktemp("ray-driver-cwd")):
        ray.init(address=local_cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()

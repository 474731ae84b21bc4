"""`tidal train` and `python -m tidal.training.run` without a cluster: argument handling and refusals."""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import yaml
from tidal.training.cli import SPEC_ENV_VAR, build_entrypoint, entrypoint_resources, register_cli
from tidal.training.run import EXIT_OK, EXIT_SPEC, main

JOBS = Path(__file__).resolve().parents[2] / "training" / "jobs"


def test_register_cli_adds_train_with_its_options_and_handler():
    parser = argparse.ArgumentParser(prog="tidal")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "training/jobs/digits.yaml", "--address", "http://127.0.0.1:8265", "--no-wait"])
    assert args.job == "training/jobs/digits.yaml"
    assert args.address == "http://127.0.0.1:8265"
    assert args.no_wait is True
    assert callable(args.func)


def test_a_spec_inside_the_working_dir_is_named_by_its_relative_path(tmp_path: Path):
    (tmp_path / "jobs").mkdir()
    job = tmp_path / "jobs" / "a.yaml"
    job.write_text("name: a\n")
    entrypoint, env = build_entrypoint(job, tmp_path, ["--standalone"])
    assert entrypoint == "python -m tidal.training.run jobs/a.yaml --standalone"
    assert env == {}


def test_a_spec_outside_the_working_dir_travels_inline(tmp_path: Path):
    job = tmp_path / "elsewhere.yaml"
    job.write_text("name: elsewhere\n")
    work = tmp_path / "project"
    work.mkdir()
    entrypoint, env = build_entrypoint(job, work, [])
    assert entrypoint == f"python -m tidal.training.run elsewhere.yaml --spec-from-env {SPEC_ENV_VAR}"
    assert base64.b64decode(env[SPEC_ENV_VAR]).decode() == "name: elsewhere\n"


def test_the_runner_refuses_a_bad_spec_before_connecting_to_any_cluster(tmp_path: Path, capsys):
    spec = yaml.safe_load((JOBS / "digits.yaml").read_text())
    spec["min_workers"], spec["max_workers"] = 6, 4
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path)]) == EXIT_SPEC
    assert "max_workers: min_workers=6 is above max_workers=4" in capsys.readouterr().err


def test_validate_only_checks_the_gpu_types_it_is_given(capsys):
    assert main([str(JOBS / "digits.yaml"), "--validate-only"]) == EXIT_OK
    assert main([str(JOBS / "digits.yaml"), "--validate-only", "--known-gpu-types", "H100,A100"]) == EXIT_SPEC
    assert "'RTX4090' is not a GPU type of this cluster; valid: A100, H100" in capsys.readouterr().err


def test_an_inline_spec_is_read_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("SPEC_B64", base64.b64encode((JOBS / "digits.yaml").read_bytes()).decode())
    assert main(["digits.yaml", "--spec-from-env", "SPEC_B64", "--validate-only"]) == EXIT_OK
    assert "digits.yaml is valid: digits" in capsys.readouterr().out


def test_a_job_driver_asks_for_job_driver_when_a_node_offers_it():
    head = {"CPU": 1.0, "node:__internal_head__": 1.0}
    driver_node = {"CPU": 8.0, "job_driver": 8.0}
    assert entrypoint_resources([head, driver_node]) == {"job_driver": 1.0}


def test_a_job_driver_asks_for_nothing_on_a_cluster_without_job_driver():
    # Asking for a resource no node has would hold the driver (and the job) PENDING for ever.
    gpu_node = {"CPU": 5.0, "GPU": 4.0}
    assert entrypoint_resources([{"CPU": 1.0}, gpu_node]) is None
    assert entrypoint_resources([{"CPU": 1.0, "job_driver": 0.5}]) is None  # no whole unit for one driver


def test_a_job_driver_asks_for_nothing_when_the_cluster_could_not_be_read():
    assert entrypoint_resources(None) is None

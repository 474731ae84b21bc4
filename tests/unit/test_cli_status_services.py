"""``tidal status``: the services table, from the arbiter's status (what each service's hook reports)."""


def test_tidal_status_lists_every_service_whoever_wrote_it_with_replicas_demand_grant_types_and_p99():
    from tidal.cluster.cli import service_rows

    status = {
        "workloads": [
            {
                "name": "shop.Digits",
                "kind": "service",
                "demand_units": 3,
                "grant": {"A100": 2},
                "held": {"A100": 2},
                "progress": {
                    "replicas": 2,
                    "p99_ms": 41.5,
                    "slo_p99_ms": 200,
                    "gpu_types": ["A100", "H100"],
                    "serve_app": "shop",
                    "serve_deployment": "Digits",
                    "warnings": ["w1"],
                },
            },
            {"name": "legacy", "kind": "service", "demand_units": 1, "grant": {}, "held": {"H100": 1}},
            {
                "name": "job-a",
                "kind": "training",
                "demand_units": 4,
                "grant": {"H100": 3},
                "held": {"H100": 3},
            },
        ]
    }
    shop, legacy = service_rows(status)
    assert (shop["name"], shop["serve"], shop["replicas"], shop["demand"]) == (
        "shop.Digits",
        "shop/Digits",
        2,
        3,
    )
    assert (shop["grant"], shop["gpu_types"], shop["p99"], shop["warnings"]) == (
        {"A100": 2},
        ["A100", "H100"],
        "41.5 / 200",
        ["w1"],
    )
    # A service whose hook reports nothing more: replicas from what it holds, p99 unknown.
    assert (legacy["replicas"], legacy["p99"], legacy["gpu_types"]) == (1, "- / -", ["H100"])


def test_tidal_status_lists_every_trainer_job_with_its_size_gpu_type_step_and_goodput():
    from tidal.cluster.cli import job_rows

    status = {
        "workloads": [
            {"name": "shop.Digits", "kind": "service", "progress": {"replicas": 2}},
            {
                "name": "digits",
                "kind": "training",
                "min_units": 1,
                "max_units": 4,
                "progress": {"workers": 2, "gpu_type": "H100", "step": 120, "phase": "running", "resizes": 1,
                             "steps_lost": 0, "goodput": 0.914},
            },  # fmt: skip
            {"name": "waiting", "kind": "training", "min_units": 2, "max_units": 2, "progress": {"workers": 0}},
            {"name": "not-a-trainer", "kind": "training", "progress": {"step": 3}},
        ]
    }
    digits, waiting = job_rows(status)
    assert digits == {
        "name": "digits", "size": 2, "bounds": "1-4", "gpu_type": "H100", "phase": "running", "step": 120,
        "resizes": 1, "steps_lost": 0, "goodput": "91%",
    }  # fmt: skip
    assert (waiting["size"], waiting["gpu_type"], waiting["step"], waiting["goodput"]) == (0, "-", None, "-")

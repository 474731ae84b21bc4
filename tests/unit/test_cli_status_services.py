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

"""Put any Ray Serve deployment under Tidal from its config: no line of the replica's code changes.

In a Serve config file (``serve deploy CONFIG``)::

    deployments:
      - name: MyModel
        ray_actor_options:
          num_gpus: 1
          label_selector: {ray.io/accelerator-type: A100}
          fallback_strategy: [{label_selector: {ray.io/accelerator-type: H100}}]
        autoscaling_config:
          min_replicas: 1
          max_replicas: 4
          upscale_delay_s: 0
          downscale_delay_s: 1
          policy:
            policy_function: tidal.serve:TidalPolicy
            policy_kwargs: {gpu_types: [A100, H100], priority: 100, slo_p99_ms: 200}

or in Python::

    from tidal.serve import autoscaling_config, ray_actor_options

    @serve.deployment(
        autoscaling_config=autoscaling_config(gpu_types=["A100", "H100"], max_replicas=4),
        ray_actor_options=ray_actor_options(gpu_types=["A100", "H100"], num_gpus=1),
    )
    class MyModel: ...

The same dicts go to ``.options(...)`` and to ``ray.serve.llm.LLMConfig(deployment_config={
"autoscaling_config": autoscaling_config(...)})``. The service registers with the arbiter as
``<app>.<deployment>`` (or ``name=``), its bounds and GPUs per replica read from the deployment itself.
"""

from __future__ import annotations

from tidal.serving.autoscale import TidalAutoscalingPolicy
from tidal.serving.config import ray_actor_options_for_types
from tidal.serving.config import user_autoscaling_config as autoscaling_config

# The Serve autoscaling policy every Tidal service names (``policy_function: tidal.serve:TidalPolicy``).
TidalPolicy = TidalAutoscalingPolicy


def ray_actor_options(*, gpu_types: list[str], num_gpus: float = 1.0, **extra: object) -> dict[str, object]:
    """``ray_actor_options`` that place replicas on the accepted GPU types, most preferred first.

    Example: ``ray_actor_options(gpu_types=["A100", "H100"])`` ->
    ``{"num_gpus": 1.0, "label_selector": {"ray.io/accelerator-type": "A100"},
    "fallback_strategy": [{"label_selector": {"ray.io/accelerator-type": "H100"}}]}``.
    """
    if not gpu_types:
        raise ValueError("gpu_types: give at least one GPU type, e.g. ['A100']")
    return ray_actor_options_for_types(list(gpu_types), num_gpus, **extra)


__all__ = ["TidalPolicy", "autoscaling_config", "ray_actor_options"]

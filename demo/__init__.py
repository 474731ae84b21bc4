"""``make demo`` (``python -m tidal.demo``) and the runtime the spike benchmark shares with it.

Modules, from the bottom up: ``scenario`` (the scenario file, validated), ``loadgen`` (the open-loop HTTP
load generator) and ``live_load`` (the same load, readable while it runs), ``timeline`` (samples and the
figures computed from them), ``model`` (the served model), ``display`` and ``plot`` (what is shown),
``runtime`` (the local cluster, arbiter, service and jobs of one run), ``run`` (one spike run of one
system) and ``main`` (the command).
"""

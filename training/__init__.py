"""Elastic Ray Train jobs under Tidal: they shrink, grow and resume as the arbiter's grant changes.

Pure (neither ray nor torch; unit-tested): ``spec`` (the job YAML, validated), ``batching`` (data order and
batch arithmetic that keep the optimisation the same at any size), ``elastic`` (the resize decisions),
``data`` (datasets shipped with installed packages).

Ray and torch: ``runner`` (the driver: grant, attempts, yield, forced stop; the Ray glue), ``loop`` (what every
Ray Train worker runs), ``run`` (``python -m tidal.training.run JOB.yaml``), ``cli`` (``tidal train``), ``models``.
Ray without torch: ``signal`` (the per-job signal actor), ``spares`` (spare worker processes).
"""

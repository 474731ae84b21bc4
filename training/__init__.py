"""Elastic Ray Train jobs under Tidal: they shrink, grow and resume as the arbiter's grant changes.

Pure (neither ray nor torch; unit-tested): ``spec`` (the job YAML, validated), ``batching`` (data order and
batch arithmetic that keep the optimisation the same at any size), ``elastic`` (the resize decisions),
``data`` (datasets shipped with installed packages).

Ray and torch: ``trainer`` (``TidalTrainer``, ``should_yield()``: public as ``tidal.train``), ``trainer_policy``
(Tidal's sizing inside Ray Train's controller), ``loop`` (the built-in loop every worker of a Tidal job runs),
``job`` (a job spec as a ``TidalTrainer``), ``run`` (``python -m tidal.training.run JOB.yaml``), ``cli``
(``tidal train``), ``models``. Ray without torch: ``trainer_signal`` (the run's signal actor), ``signal`` (a
progress board for runs without an arbiter), ``spares`` (spare worker processes).
"""

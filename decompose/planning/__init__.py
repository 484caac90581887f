"""Choosing what to build for every conv, before anything is built: the per-layer rules and
the planner (:mod:`.plan`), the global budget optimiser (:mod:`.budget`), timing layers on this
machine for forms, latency-aware plans and latency budgets (:mod:`.timing`), and output errors
measured on calibration images for data-aware budgets (:mod:`.sensitivity`)."""

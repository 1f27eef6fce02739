"""Training: the one loop and the Hydra entry point (loop.py), what K vmapped runs need (stack.py), AdamW and schedules,
checkpoints, sharding, the run-dir lock and tracking. `python -m scaling.train [overrides]` trains."""

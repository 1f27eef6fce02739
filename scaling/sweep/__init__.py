"""Sweeps: budgets -> planned runs (plan.py, pure) and planned runs -> Hydra jobs, manifest, collect (schedule.py).
`python -m scaling.sweep collect SWEEP_DIR` writes the runs table."""

"""Hydra sweeper that expands a FLOP-budget plan (scaling.sweep.plan) into jobs: `hydra/sweeper=plan`."""

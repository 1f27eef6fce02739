"""Hydra sweeper that expands a FLOP-budget plan (scaling.plan) into jobs: `hydra/sweeper=plan`."""

"""Scaling-law analysis: load run records / CSV / wandb runs, fit Kaplan and Chinchilla laws with bootstrap
intervals, backtest, plot and report. Pure numpy/scipy/pandas/matplotlib: never imports JAX or the trainer."""

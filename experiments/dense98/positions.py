"""Post hoc (session 20): what makes dense98's d72 turn in D (README, "the loss in D at fixed size steepens"). The same
d72 (5 layers, µP, lr 8e-3, seed 0) as one constant-lr parent to 9.36M tokens, varied in one thing at a time: the head
size (4, the family's; 8; 24) with learned positions, then rotary or sinusoidal positions at head size 8 (those two
parents stopped at ~6.4M tokens). Prints each parent's training loss at constant lr, averaged over the 15% of tokens
before each doubling (as long_ladder.py), and the cooldown branch ends of the head-size ladders:

    python experiments/dense98/positions.py   # reads positions_parent_curves.csv, long_runs.csv, heads_runs.csv
"""
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent

curves = pd.read_csv(HERE / "positions_parent_curves.csv")
points = [3.66e5 * 2 ** i for i in range(5)]
print("training loss at constant lr (mean over the 15% of tokens before D), and its drop per doubling of D")
print(f"{'variant':26s} " + " ".join(f"{D:>8.3g}" for D in points))
for variant, c in curves.groupby("variant", sort=False):
    means = [c[(c.tokens > D / 1.15) & (c.tokens <= D)].train_loss.mean() for D in points]
    print(f"{variant:26s} " + " ".join(f"{m:8.3f}" for m in means))
    print(f"{'  drop per doubling':26s} {'':8s} " + " ".join(f"{a - b:8.3f}" for a, b in zip(means, means[1:])))

long = pd.read_csv(HERE / "long_runs.csv")
branches = pd.concat([long[long.d_model == 72], pd.read_csv(HERE / "heads_runs.csv")])
branches = branches[branches.schedule == "wsd"].assign(head_size=lambda t: t.d_model // t.n_heads)
print("\ncooldown branch ends (validation loss), learned positions, by head size; drop per doubling of D")
for K, b in branches.groupby("head_size"):
    b = b.sort_values("D")
    drops = [(x - y) / np.log2(e / d) for x, y, d, e in zip(b.loss, b.loss[1:], b.D, b.D[1:])]
    print(f"head size {K:2d} ({b.n_heads.iloc[0]:2d} heads): " + " ".join(f"{D:.3g}: {L:.4f}" for D, L in zip(b.D, b.loss))
          + "   drops " + " ".join(f"{x:.3f}" for x in drops))

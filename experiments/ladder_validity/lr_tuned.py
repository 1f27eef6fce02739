"""Ladder validity at each schedule's own best learning rate (issue 17 item 2), d48: cosine runs and cooldown branches
over an lr grid of ~1.4x steps with two seeds; per D and schedule, the seed-mean loss against lr, its optimum by the
parabola in ln(lr) through the best grid point and its neighbours (analysis.laws.lr.fit_lr_curve), and the gap of
the branches' optimum to the cosine runs' optimum. The same per seed shows how much of the gap one seed can move.

    python experiments/ladder_validity/lr_tuned.py experiments/ladder_validity/lr_tuned_runs.csv
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from analysis.laws.lr import fit_lr_curve


def optimum(g: pd.DataFrame) -> tuple[float, float]:
    """(lr, loss) at the parabola's vertex, or at the best grid point when it sits at an edge of the grid."""
    curve = g.groupby("lr")["loss"].mean()
    fit = fit_lr_curve(curve.index.to_numpy(float), curve.to_numpy(float))
    if fit["lr_opt"] is None:
        return fit["best_lr"], fit["best_loss"]
    return fit["lr_opt"], fit["loss_opt"]


def main(path: str) -> None:
    df = pd.read_csv(path)
    df = df[df["schedule"].isin(["cosine", "wsd"])].assign(kind=lambda d: d["schedule"].map({"cosine": "cosine",
                                                                                           "wsd": "branch"}))
    table = df.pivot_table(index=["D", "lr"], columns=["kind", "seed"], values="loss")
    print("validation loss (nats/token) by D, lr, schedule and seed:\n")
    print(table.round(4).to_string())
    print("\n| D | cosine lr* | cosine L* | branch lr* | branch L* | gap | gap seed 0 | gap seed 1 | seed std (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for D, g in df.groupby("D"):
        opt = {k: optimum(g[g["kind"] == k]) for k in ("cosine", "branch")}
        per_seed = []
        for s in sorted(g["seed"].unique()):
            gs = g[g["seed"] == s]
            per_seed.append(optimum(gs[gs["kind"] == "branch"])[1] / optimum(gs[gs["kind"] == "cosine"])[1] - 1)
        spread = g.groupby(["kind", "lr"])["loss"].std().median()
        gap = opt["branch"][1] / opt["cosine"][1] - 1
        print(f"| {D:.3g} | {opt['cosine'][0]:.3g} | {opt['cosine'][1]:.4f} | {opt['branch'][0]:.3g} | "
              f"{opt['branch'][1]:.4f} | {100 * gap:+.2f}% | " + " | ".join(f"{100 * x:+.2f}%" for x in per_seed)
              + f" | {spread:.4f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])

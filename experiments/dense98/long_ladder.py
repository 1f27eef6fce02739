"""Post hoc (session 19): the loss in D at fixed size over the 10x the prediction spans. One WSD parent per size for
two of the verification's sizes (d44, d72) and two of the sweep's smaller ones (d12, d24) to 9.4e6 tokens, cooldown branches at 1.46e6, 2.93e6, 5.85e6 and 1.17e7
tokens (seed 0), beside the sweep's own branch ends of those sizes (d44; d76 is the sweep's nearest to d72) and the
verification runs, with the drop per doubling of D and Approach 3's surface through the sweep (surfaces.py); then
each parent's training loss at constant lr (long_parent_curves.csv: the parents' metrics.jsonl rows), averaged over
the 15% of tokens before each doubling:

    python experiments/dense98/long_ladder.py   # reads runs.csv, long_runs.csv, long_small_runs.csv, verify*_runs.csv
"""
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.laws.approach3 import fit_approach3
from analysis.load import load_runs_csv, usable

HERE = Path(__file__).resolve().parent


def table(name: str) -> pd.DataFrame:
    return usable(load_runs_csv(HERE / name, n="total"))


sweep = table("runs.csv")
long = pd.concat([table("long_runs.csv"), table("long_small_runs.csv")])  # d44, d72; then d12, d24
verify = pd.concat([table("verify_runs.csv"), table("verify_quarter_runs.csv")])
means = sweep.groupby(["N", "D"], as_index=False).loss.mean()
surface = fit_approach3(means.N, means.D, means.loss)
for N in sorted(long.N.unique()):
    rows = [("ladder, seed 0", r.D, r.loss) for r in long[long.N == N].itertuples()]
    near = sweep[np.abs(np.log(sweep.N / N)) < 0.1]  # the sweep's branch ends of this size (within 10% in N)
    rows += [(f"sweep (N {g.N.iloc[0]:.3g}), seed {int(s)}", D, g.loss.iloc[0])
             for (D, s), g in near.groupby(["D", "seed"]) if s == 0]
    rows += [("verification, seed 0", r.D, r.loss) for r in verify[(verify.N == N) & (verify.seed == 0)].itertuples()]
    rows.sort(key=lambda r: r[1])
    print(f"== N {N:.3g} (total)")
    prev = None
    for what, D, loss in rows:
        drop = f"{(prev[1] - loss) / np.log2(D / prev[0]):.3f}/doubling" if prev and D > prev[0] * 1.05 else ""
        print(f"   {what:28s} D {D:9.3g}  loss {loss:.4f}  surface {float(surface(N, D)):.4f}  {drop}")
        if what.startswith(("ladder", "sweep")):
            prev = (D, loss)

curves = pd.read_csv(HERE / "long_parent_curves.csv")
for run, c in curves.groupby("run"):
    points = [3.66e5 * 2 ** i for i in range(6) if 3.66e5 * 2 ** i <= c.tokens.max()]
    means = [c[(c.tokens > D / 1.15) & (c.tokens <= D)].train_loss.mean() for D in points]
    print(f"== {run}, training loss at constant lr: " + "  ".join(f"{D:.3g}: {m:.3f}" for D, m in zip(points, means)))
    print("   drop per doubling: " + "  ".join(f"{a - b:.3f}" for a, b in zip(means, means[1:])))

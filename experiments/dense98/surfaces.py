"""Post hoc (after dense98's verification, session 19): can an L(N, D) surface fitted to a study's ladder points
predict its verification runs? Approach 3 (Hoffmann et al. 2022 eq. 2, `analysis.laws.approach3.fit_approach3`, the
paper's Huber fit) on the branch ends of each of the four 10x studies, scored on every verification size (seed
means), not only the best one; tokens per parameter (D / N total) beside each. Then the same fit on only the longer
runs (D at least 3e5 .. 2e6 tokens), whose curvature in D is not the short runs'.

    python experiments/dense98/surfaces.py
"""
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.laws.approach3 import fit_approach3
from analysis.load import load_runs_csv, usable

EXPERIMENTS = Path(__file__).resolve().parent.parent
STUDIES = ("ladder98", "deep98", "six98", "dense98")
MIN_D = (3e5, 6e5, 1e6, 2e6)


def seed_means(paths: list[Path]) -> pd.DataFrame:
    df = pd.concat([usable(load_runs_csv(p, n="total")) for p in paths])
    return df.groupby(["N", "D"], as_index=False).loss.mean()


def rel_err(fit, pts: pd.DataFrame) -> np.ndarray:
    return 100 * (fit(pts.N, pts.D) / pts.loss - 1).to_numpy()


for study in STUDIES:
    fitted = seed_means([EXPERIMENTS / study / "runs.csv"])
    verify = seed_means(sorted((EXPERIMENTS / study).glob("verify*_runs.csv")))
    f = fit_approach3(fitted.N, fitted.D, fitted.loss)
    tpp = fitted.D / fitted.N
    print(f"== {study}: {len(fitted)} points (seed means), D/N {tpp.min():.1f}-{tpp.max():.0f}; E {f.E:.3f}, "
          f"alpha {f.alpha:.3f}, beta {f.beta:.3f}; in-sample RMS {np.sqrt(np.mean(rel_err(f, fitted) ** 2)):.2f}%; "
          f"best verification run {verify.loss.min():.4f}")
    for r, err in zip(verify.itertuples(), rel_err(f, verify)):
        # the fitted points of the same size (within 10% in N): how far beyond their D the verification run is
        same = fitted[np.abs(np.log(fitted.N / r.N)) < 0.1]
        beyond = f"{r.D / same.D.max():.1f}x its size's largest fitted D" if len(same) else "a size not in the sweep"
        print(f"   N {r.N:9.3g}  D/N {r.D / r.N:6.1f}  run {r.loss:.4f}  surface {f(r.N, r.D):.4f}  {err:+.2f}%  "
              f"({beyond})")
    for min_D in MIN_D:
        longer = fitted[fitted.D >= min_D]
        if len(longer) >= 8:
            g = fit_approach3(longer.N, longer.D, longer.loss)
            print(f"   only D >= {min_D:.0e}: {len(longer):2d} points, E {g.E:.3f}; verification sizes "
                  + " ".join(f"{e:+.2f}%" for e in rel_err(g, verify)))

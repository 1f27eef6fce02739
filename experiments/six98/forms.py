"""Post hoc (after the verification): L_opt(C) at 10x from IsoFLOP minima estimated four ways, in the three
studies: python experiments/six98/forms.py 3.9120 (six98's best verification loss)."""
import math, sys
import numpy as np
from analysis.load import load_runs_csv, usable
from analysis.laws.fits import fit_approach2, fit_kaplan

STUDIES = {"ladder98": (9.6e13, 4.4896), "deep98": (4.8e13, 4.8268), "six98": (1.92e13, float(sys.argv[1]))}


def minima_near(df, k):
    """Parabola in ln N through the k lowest-loss points of each budget (seed means)."""
    out = []
    for C, g in df.groupby("budget"):
        m = g.groupby("N").loss.mean().sort_values()
        pts = m.iloc[:k]
        x = np.log(pts.index.to_numpy()); y = pts.to_numpy()
        c2, c1, c0 = np.polyfit(x, y, 2)
        out.append((C, c0 - c1 ** 2 / (4 * c2) if c2 > 0 else m.iloc[0]))
    return np.array(out)


def forms(C, L, Cv):
    irr = fit_kaplan(C, L, variable="C", irreducible=True); pure = fit_kaplan(C, L, variable="C")
    i = np.argsort(C); (C1, C2), (L1, L2) = C[i][-2:], L[i][-2:]
    loc = L2 + (L2 - L1) / math.log(C2 / C1) * math.log(Cv / C2)
    p3 = np.polyfit(np.log(C[i][-3:]), L[i][-3:], 1)
    return {"irreducible": float(irr(Cv)), "pure": float(pure(Cv)), "local2": loc,
            "local3": float(np.polyval(p3, math.log(Cv)))}


for s, (Cv, obs) in STUDIES.items():
    df = usable(load_runs_csv(f"experiments/{s}/runs.csv", n="total"))
    a2 = fit_approach2(df).minima.sort_values("C")
    ak = fit_approach2(df, method="akima").minima.sort_values("C")
    rows = {"parabola, all sizes": (a2.C.to_numpy(), a2.loss_opt.to_numpy()),
            "akima": (ak.C.to_numpy(), ak.loss_opt.to_numpy()),
            "parabola, 5 lowest": tuple(minima_near(df, 5).T),
            "parabola, 3 lowest": tuple(minima_near(df, 3).T)}
    print(f"== {s}: runs {obs:.4f}")
    for name, (C, L) in rows.items():
        f = forms(np.asarray(C, float), np.asarray(L, float), Cv)
        print(f"  {name:20s} minima {np.round(L, 3)}  " +
              "  ".join(f"{k} {v:.4f} ({(v / obs - 1) * 100:+.2f}%)" for k, v in f.items()))

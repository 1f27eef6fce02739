"""Which approach to trust 4x beyond the data? Each one's backtest on this sweep, run before the prediction was committed:
fit the budgets below the largest (5e11..5e12), predict the largest budget's (1.5e13) IsoFLOP minimum, compare.

    python experiments/mix98/backtest.py multirun/mix98 > experiments/mix98/backtest.txt

Approach 3 is fitted on all runs and on the subsets a practitioner might drop (the width-8 model, the smallest
budget), to show how much its extrapolation depends on such choices.
"""

import sys
import warnings

from analysis.laws.approach3 import TokenCost, constrained_optimum, fit_approach3
from analysis.laws.fits import fit_approach2, fit_kaplan, isoflop_minimum
from analysis.load import load_sweep, usable

warnings.filterwarnings("ignore", category=RuntimeWarning)
runs = usable(load_sweep(sys.argv[1] if len(sys.argv) > 1 else "multirun/mix98", c="chinchilla"))
cost = TokenCost.from_runs(runs)
C_top = float(runs["budget"].max())
below, top = runs[runs["budget"] < C_top], runs[runs["budget"] == C_top]
observed = isoflop_minimum(top, C_top)
print(f"held out: C = {C_top:.3g}; its parabola minimum N_opt = {observed['N_opt']:.4g}, L = {observed['loss_opt']:.4f} "
      f"(best run {top['loss'].min():.4f})")
print(f"fitted on: {len(below)} runs at C = {', '.join(f'{c:.3g}' for c in sorted(below['budget'].unique()))}\n")

a2 = fit_approach2(below)
L2 = fit_kaplan(a2.minima["C"], a2.minima["loss_opt"], variable="C", irreducible=len(a2.minima) >= 4)
N2, l2 = float(a2.N_opt(C_top)), float(L2(C_top))
print(f"approach 2 ({len(a2.minima)} bracketed budgets): N_opt = {N2:.4g} ({N2 / observed['N_opt'] - 1:+.1%}), "
      f"L_opt = {l2:.4f} ({l2 / observed['loss_opt'] - 1:+.2%})")

subsets = {
    "all runs": lambda r: r,
    "without d8": lambda r: r[r["N"] > 2000],
    "without C=5e11": lambda r: r[r["budget"] > 6e11],
    "without d8 and C=5e11": lambda r: r[(r["budget"] > 6e11) & (r["N"] > 2000)],
    "without d8, d16": lambda r: r[r["N"] > 7000],
}
for name, pick in subsets.items():
    f = fit_approach3(pick(below)["N"], pick(below)["D"], pick(below)["loss"])
    try:
        N3, _, l3 = constrained_optimum(f, C_top, cost, (float(runs["N"].min()) / 30, float(runs["N"].max()) * 30))
        print(f"approach 3, {name:22s}: N_opt = {N3:.4g} ({N3 / observed['N_opt'] - 1:+.1%}), L_opt = {l3:.4f} "
              f"({l3 / observed['loss_opt'] - 1:+.2%}); alpha = {f.alpha:.3f}, beta = {f.beta:.3f}, E = {f.E:.3f}")
    except ValueError as exc:
        print(f"approach 3, {name:22s}: no interior optimum ({exc})")

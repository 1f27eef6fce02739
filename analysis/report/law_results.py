"""One law fitted for the CLI (`python -m analysis fit ... --law NAME`): estimates with bootstrap intervals, the
backtest on larger models, the residual figure, and the text printed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.laws.law import Law, backtest_law, fit_with_intervals, plot_law_fit
from scaling.record import clean_json


def fit_law_results(law: Law, df: pd.DataFrame, *, n_bootstrap: int = 200, seed: int = 0, n_jobs: int = 2,
                    backtest_N_below: float | None = None, plots: Path | None = None) -> dict:
    """The JSON-ready results of fitting `law` to the usable runs `df` (the data-constrained law adds the
    compute-optimal allocation under its data limit, analysis.laws.data_constrained)."""
    from analysis.laws.data_constrained import DATA_CONSTRAINED, fit_data_constrained

    if law == DATA_CONSTRAINED:
        res = fit_data_constrained(df, n_bootstrap=n_bootstrap, seed=seed, n_jobs=n_jobs)
        fit = res.pop("_fit")
    else:
        r = fit_with_intervals(law, df, n_bootstrap=n_bootstrap, seed=seed, n_jobs=n_jobs)
        fit = r["fit"]
        res = {"law": law.name, "reference": law.reference, **fit.params, "param_names": list(law.param_names),
               "ci95": r["ci95"], "n_resamples": r["n_resamples"], "n_failed": r["n_failed"],
               "n_points": fit.n_points, "at_bound": list(fit.at_bound)}
    res["expression"] = law.expression
    if backtest_N_below is not None:
        res["backtest"] = backtest_law(law, df, backtest_N_below).summary()
    if plots is not None:
        res["figures"] = [str(p) for p in plot_law_fit(fit, df, plots)]
    return clean_json(res)


def law_summary(res: dict) -> str:
    lines = [f"law {res['law']}" + (f" ({res['reference']})" if res.get("reference") else "") + f": {res['n_points']} "
             "runs" + (f", in {res['stages']}" if res.get("stages") else "")]
    ci = res.get("ci95") or {}
    for k in res["param_names"]:
        v, lo_hi = res[k], ci.get(k)
        note = " (at a bound: not identified)" if k in res.get("at_bound", []) else ""
        lines.append(f"  {k} = {v:.6g}" + (f" [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else "") + note)
    if res.get("n_resamples"):
        lines.append(f"  (95% bootstrap intervals over runs: {res['n_resamples']} resamples, {res['n_failed']} failed)")
    a = res.get("allocation")
    if a and "error" not in a:
        lines.append(f"  compute-optimal at C={a['C']:.3g} with at most {a['U_max']:.3g} unique tokens: N={a['N']:.4g}, "
                     f"D={a['D']:.4g} ({a['epochs']:.3g} epochs), loss {a['loss']:.4f}")
    elif a:
        lines.append(f"  compute-optimal allocation: not found ({a['error']})")
    bt = res.get("backtest")
    if bt:
        lines.append(f"  backtest (fit N < {bt['N_below']:.3g}, predict {bt['n_test_runs']} runs up to "
                     f"{bt['N_ratio']:.3g}x larger): mean |rel. error| {bt['mean_abs_rel_error']:.2%}, max "
                     f"{bt['max_abs_rel_error']:.2%}")
    return "\n".join(lines)

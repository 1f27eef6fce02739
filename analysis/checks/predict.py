"""Predict the compute-optimal run at a budget before training it, then score the prediction on the runs trained there.

Small models break C = k N D with one k: the tied embedding/head costs ~6 V d_model FLOPs per token whatever the
body's N, so across a family of tiny decoders C / (N D) falls from hundreds to ~10 (see experiments/mix98). Each
approach's optimum is therefore taken on the family's own budget line D(N) = C / f(N), where f, the FLOPs per token
as a function of N, is read off the runs' records (C / D of each size), instead of on C = 6ND.

  Approach 2 (Hoffmann et al. 2022 sec. 3.2): N_opt = k C^a from the IsoFLOP minima; D_opt = C / f(N_opt);
    L_opt from the minima's losses in one of two forms (`l_form`): L(C) = E_C + (C_c / C)^alpha_C (Kaplan et al.
    2020 eq. 1.3 plus an irreducible term, as their eq. 1.4 / Hoffmann eq. 2 have one; needs 4+ budgets) or the pure
    power law (C_c / C)^alpha_C (eq. 1.3), or their mean. Over ~30x of budgets the two forms can fit the minima
    equally well and still part by several percent at 10x (experiments/ladder98: 4.635 vs 4.381, the runs 4.490):
    `average` predicts their mean and joins their intervals, so the interval carries the choice of form. `local`
    continues the last fitted doubling: a least-squares line in log C through the minima of the budgets within 2x of
    the largest (the two largest when budgets are 2x apart), the local slope at the top (Kaplan et al. 2020 eq. 1.3
    with alpha_C L ~ constant over the extrapolated range). Post hoc it was within 0.5% at 10x in both ladder98 and
    deep98 (experiments/deep98); committed before their runs it missed by +1.93% (six98) and, over three minima of
    denser budgets, +1.73% (experiments/dense98/README.md); no form was within 1% in all studies.
  Approach 3 (sec. 3.3, eq. 2): argmin over N of L(N, C / f(N)) for the fitted L = E + A/N^alpha + B/D^beta.
Intervals: percentile bootstrap over runs within budgets (analysis.checks.uncertainty).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import TARGETS
from analysis.laws.approach3 import Approach3Fit, TokenCost, constrained_optimum, fit_approach3
from analysis.laws.fits import fit_approach2, fit_kaplan, isoflop_key, isoflop_minimum, slice_C
from analysis.checks.seeds import SIGMA, replicate_points
from analysis.checks.uncertainty import bootstrap

PREDICT_APPROACHES = ("approach2", "approach3")
L_FORMS = ("irreducible", "pure", "average", "local")
FORM_KEYS = ("irreducible", "pure", "local")  # the forms every prediction reports (average is built from two)


# The local form's span: the budgets within this factor of the largest (2% slack for achieved-vs-nominal C).
LOCAL_SPAN = 2.0


def local_line(C: np.ndarray, L: np.ndarray, C_at: float) -> float:
    """The local form: the least-squares line in log C through the IsoFLOP minima of the top doubling of budgets
    (Kaplan et al. 2020 eq. 1.3 with alpha_C L ~ constant over the extrapolated range), evaluated at C_at. With
    budgets 2x apart it is the line through the two largest minima; denser budgets put more minima into the same
    doubling, which averages their scatter without reaching further down the bending curve."""
    C, L = np.asarray(C, float), np.asarray(L, float)
    top = np.flatnonzero(C >= C.max() / LOCAL_SPAN / 1.02)
    if len(top) < 2:  # the two largest budgets more than 2x apart: their line is still the local slope
        top = np.argsort(C)[-2:]
    slope, intercept = np.polyfit(np.log(C[top]), L[top], 1)
    return float(intercept + slope * math.log(C_at))


@dataclasses.dataclass(frozen=True)
class PredictionStat:
    """Every approach's compute-optimal (N, D, L) at budget C on the family's budget line (picklable: bootstraps)."""

    C: float
    cost: TokenCost
    N_range: tuple[float, float]
    isoflop_method: str = "parabola"
    init: tuple | None = None  # Approach 3 warm start (E, A, B, alpha, beta); None searches the paper's grid
    l_form: str = "irreducible"  # Approach 2's L_opt(C): one of L_FORMS (module docstring)

    def fit3(self, df: pd.DataFrame) -> Approach3Fit:
        return fit_approach3(df["N"], df["D"], df["loss"], n_starts=0 if self.init else 32, init=self.init)

    def approach2(self, df: pd.DataFrame) -> dict:
        a2 = fit_approach2(df, method=self.isoflop_method)
        N2 = float(a2.N_opt(self.C))
        C, L = a2.minima["C"], a2.minima["loss_opt"]
        pure = fit_kaplan(C, L, variable="C")
        # The irreducible term needs 4+ budgets (3 parameters and one point to spare); with fewer, both forms are pure.
        irr = fit_kaplan(C, L, variable="C", irreducible=True) if len(C) >= 4 else pure
        L_irr, L_pure = float(irr(self.C)), float(pure(self.C))
        L_local = local_line(C.to_numpy(), L.to_numpy(), self.C)
        L_opt = {"irreducible": L_irr, "pure": L_pure, "average": (L_irr + L_pure) / 2, "local": L_local}[self.l_form]
        return {"approach2.a": a2.N_opt.a, "approach2.b": a2.D_opt.a, "approach2.alpha_C": irr.alpha,
                "approach2.E_C": irr.E, "approach2.alpha_C_pure": pure.alpha, "approach2.N_opt": N2,
                "approach2.D_opt": float(self.cost.D(N2, self.C)), "approach2.L_opt": L_opt,
                "approach2.L_opt_irreducible": L_irr, "approach2.L_opt_pure": L_pure, "approach2.L_opt_local": L_local}

    def approach3(self, df: pd.DataFrame) -> tuple[dict, Approach3Fit]:
        a3 = self.fit3(df)
        N3, D3, L3 = constrained_optimum(a3, self.C, self.cost, self.N_range)
        # The exponent of N_opt in C along the budget line, d log N_opt / d log C over [C/2, 2C]: eq. 4's
        # a = beta / (alpha + beta) holds only when C = k N D with one k.
        lo, hi = (constrained_optimum(a3, c, self.cost, self.N_range)[0] for c in (self.C / 2, self.C * 2))
        return {"approach3.E": a3.E, "approach3.A": a3.A, "approach3.B": a3.B, "approach3.alpha": a3.alpha,
                "approach3.beta": a3.beta, "approach3.N_opt": N3, "approach3.D_opt": D3, "approach3.L_opt": L3,
                "approach3.a_local": math.log(hi / lo) / math.log(4.0)}, a3

    def __call__(self, df: pd.DataFrame) -> dict:
        out = self.approach2(df)
        three, a3 = self.approach3(df)
        out["approach2.L_opt_by_approach3"] = float(a3(out["approach2.N_opt"], out["approach2.D_opt"]))
        return {**out, **three}


def backtest_approaches(runs: pd.DataFrame, cost: TokenCost, N_range: tuple[float, float], *,
                        isoflop_method: str = "parabola", l_form: str = "irreducible", n_held: int = 1) -> dict:
    """Each approach fitted on the budgets below the `n_held` largest and scored on the largest budget's IsoFLOP
    minimum (relative errors of N_opt and L_opt): the evidence for choosing the headline before extrapolating further.
    n_held = 1 extrapolates one budget step; more steps reach the horizon a prediction itself extrapolates
    (`backtest_horizons`)."""
    key = isoflop_key(runs)
    budgets = sorted(float(c) for c in runs[key].unique())
    top_budget = budgets[-1]
    fitted = budgets[:-n_held] if n_held < len(budgets) else []
    below, top = runs[runs[key].isin(fitted)], runs[runs[key] == top_budget]
    if len(fitted) < 2:
        raise ValueError(f"backtest: {len(fitted)} budget(s) below the {n_held} largest (top {top_budget:.3g}); need "
                         "at least 2 to fit and one more to score")
    observed = isoflop_minimum(top, top_budget, method=isoflop_method)
    C_top = observed["C"]  # the largest slice's C in the table's convention (its budget, unless converted)
    stat = PredictionStat(C=C_top, cost=cost, N_range=N_range, isoflop_method=isoflop_method, l_form=l_form)
    C_fitted = slice_C(below[below[key] == fitted[-1]], fitted[-1])
    out = {"C": C_top, "fitted_budgets": fitted, "horizon": C_top / C_fitted,
           "observed": {"N_opt": observed["N_opt"], "L_opt": observed["loss_opt"]}}
    for name in PREDICT_APPROACHES:
        try:
            r = stat.approach2(below) if name == "approach2" else stat.approach3(below)[0]
        except ValueError as exc:
            out[name] = {"error": str(exc)}
            continue
        N, L = r[f"{name}.N_opt"], r[f"{name}.L_opt"]
        out[name] = {"N_opt": N, "L_opt": L, "rel_error_N": N / observed["N_opt"] - 1,
                     "rel_error_L": L / observed["loss_opt"] - 1}
        if name == "approach2":  # every form's error, whichever l_form the headline uses
            out[name]["rel_error_L_by_form"] = {f: r[f"approach2.L_opt_{f}"] / observed["loss_opt"] - 1
                                                for f in FORM_KEYS}
    return out


def backtest_horizons(runs: pd.DataFrame, cost: TokenCost, N_range: tuple[float, float], *,
                      isoflop_method: str = "parabola", l_form: str = "irreducible", min_fitted: int = 3) -> list[dict]:
    """The backtest at every horizon the budgets allow: fit the lowest budgets, hold out 1, 2, ... of the largest,
    score the largest, while at least `min_fitted` budgets remain to fit. A 10x prediction whose backtests reach 2x
    says little about 10x (experiments/ladder98: 0.2% at 2x, 3.25% at 10x); the longest horizons are the closer test,
    on fewer budgets."""
    key = isoflop_key(runs)
    n_budgets = runs[key].nunique()
    return [backtest_approaches(runs, cost, N_range, isoflop_method=isoflop_method, l_form=l_form, n_held=k)
            for k in range(1, n_budgets - min_fitted + 1)]


def predict(runs: pd.DataFrame, C: float, *, headline: str = "auto", n_bootstrap: int = 200, seed: int = 0,
            n_jobs: int = 2, isoflop_method: str = "parabola", conventions: dict | None = None,
            l_form: str = "irreducible") -> dict:
    """The prediction at budget C from usable runs (one row per run: name, N, D, C, loss, budget), with 95% bootstrap
    intervals. `headline` names the approach whose (N, D, L) is the committed prediction; "auto" takes the one with
    the smallest loss error in the backtest on the largest budget (`backtest_approaches`). `l_form` is Approach 2's
    L_opt(C) (module docstring); under `average` its interval joins both forms' intervals."""
    if headline not in PREDICT_APPROACHES + ("auto",):
        raise ValueError(f"headline={headline!r} is unknown; use auto or one of {PREDICT_APPROACHES}")
    if l_form not in L_FORMS:
        raise ValueError(f"l_form={l_form!r} is unknown; use one of {L_FORMS} (e.g. --l-form average when the "
                         "fitted budgets cannot tell a floor from a pure power law)")
    if not C > 0:
        raise ValueError(f"prediction budget C={C!r} must be positive, e.g. 4x the largest fitted budget")
    cost = TokenCost.from_runs(runs)
    N_range = (float(runs["N"].min()) / 30, float(runs["N"].max()) * 30)
    try:
        horizons = backtest_horizons(runs, cost, N_range, isoflop_method=isoflop_method, l_form=l_form)
    except ValueError:  # the largest budget has no IsoFLOP minimum to score: the one-step backtest says why
        horizons = []
    try:  # the one-step backtest is the first horizon (with fewer than 4 budgets there are none)
        backtest = horizons[0] if horizons else backtest_approaches(runs, cost, N_range, isoflop_method=isoflop_method,
                                                                    l_form=l_form)
    except ValueError as exc:
        backtest = {"error": str(exc)}
    if headline == "auto":
        scored = {k: abs(backtest[k]["rel_error_L"]) for k in PREDICT_APPROACHES if "rel_error_L" in backtest.get(k, {})}
        if not scored:
            raise ValueError(f"--headline auto: no approach could be backtested ({backtest.get('error', backtest)}); "
                             "name the headline, e.g. --headline approach2")
        headline = min(scored, key=scored.get)
    full = PredictionStat(C=C, cost=cost, N_range=N_range, isoflop_method=isoflop_method, l_form=l_form)
    a3 = full.fit3(runs)
    stat = dataclasses.replace(full, init=(a3.E, a3.A, a3.B, a3.alpha, a3.beta))
    strata = isoflop_key(runs)
    boot = bootstrap(runs, stat, n_resamples=n_bootstrap, seed=seed, n_jobs=n_jobs, strata=strata)
    est, ci = boot.estimate, boot.ci
    if l_form == "average":  # the runs' scatter under either form, and the gap between the forms
        forms = [ci[f"approach2.L_opt_{f}"] for f in ("irreducible", "pure")]
        ci = {**ci, "approach2.L_opt": [min(lo for lo, _ in forms), max(hi for _, hi in forms)]}
    top = runs[runs[strata] == runs[strata].max()]
    largest = slice_C(top, float(top[strata].iloc[0]))  # in the table's convention
    out = {
        "C": C, "C_over_largest_budget": C / largest, "headline": headline, "l_form": l_form,
        "conventions": conventions or {},
        "n_runs": int(len(runs)), "n_resamples": len(boot.samples), "n_failed": boot.n_failed,
        "token_cost": cost.as_dict(),
        "prediction": {k: est[f"{headline}.{k}"] for k in ("N_opt", "D_opt", "L_opt")},
        "prediction_ci95": {k: ci[f"{headline}.{k}"] for k in ("N_opt", "D_opt", "L_opt")},
        "estimates": est, "ci95": ci, "backtest": backtest, "backtest_horizons": horizons,
    }
    # For the planner: plan.prior_fit = [G, a] centres an IsoFLOP grid at budget C on the predicted N_opt.
    a = float(est["approach2.a"])
    out["prior_fit"] = [out["prediction"]["N_opt"] / C ** a, a]
    return out


# What `verify` reads of a prediction.json: (object, key) or (key,) -> "number" | "interval" (two numbers, low <= high).
PREDICTION_KEYS = {("C",): "number", **{("prediction", k): "number" for k in ("N_opt", "D_opt", "L_opt")},
                   ("prediction_ci95", "N_opt"): "interval", ("prediction_ci95", "L_opt"): "interval",
                   **{("estimates", f"approach3.{k}"): "number" for k in ("E", "A", "B", "alpha", "beta")}}


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_prediction(path: str | Path) -> dict:
    """prediction.json as `predict` wrote it, checked for every key `verify` reads (a hand-edited or truncated file is
    one ValueError naming the file, the key and the fix)."""
    fix = ("give the prediction.json that `python -m analysis predict` wrote (restore it from your commit if it was "
           "edited)")
    try:
        p = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the prediction ({exc}); {fix}") from None
    if not isinstance(p, dict):
        raise ValueError(f"{path}: holds a JSON {type(p).__name__}, not the prediction object; {fix}")
    for keys, kind in PREDICTION_KEYS.items():
        parent, key = (p, keys[0]) if len(keys) == 1 else (p.get(keys[0]), ".".join(keys))
        if not isinstance(parent, dict):
            raise ValueError(f"{path}: key {keys[0]!r} is {'missing' if parent is None else repr(parent)[:60]}, "
                             f"expected an object; {fix}")
        v = parent.get(keys[-1])
        ok = (_is_number(v) and (key != "C" or v > 0) if kind == "number" else
              isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)) and v[0] <= v[1])
        if not ok:
            want = ("a positive number of FLOPs" if key == "C" else "a number" if kind == "number" else
                    "an interval [low, high] of two numbers")
            raise ValueError(f"{path}: key {key!r} is {'missing' if v is None else repr(v)[:60]}, expected {want}; "
                             f"{fix}")
    conv = p.get("conventions", {})
    if not isinstance(conv, dict) or not all(isinstance(v, str) for v in conv.values()):
        raise ValueError(f"{path}: key 'conventions' is {repr(conv)[:60]}, expected an object of names (N, C); {fix}")
    if not isinstance(p.get("headline", ""), str):
        raise ValueError(f"{path}: key 'headline' is {repr(p['headline'])[:60]}, expected a name; {fix}")
    return p


def verify(prediction: dict, runs: pd.DataFrame) -> dict:
    """Score a committed prediction on the runs trained at its budget: the relative error of the predicted loss
    against the best observed size, each run's loss against Approach 3's L(N, D) of the prediction's fit, and whether
    the best observed size is the one nearest the predicted N_opt. Seed replicates (runs of equal N and D) are one
    size: its loss is their mean, with their spread beside it."""
    if runs.empty:
        raise ValueError("verify: no usable runs to score the prediction on; train the verification sweep first")
    C = float(prediction["C"])
    off = (runs["C"] / C - 1).abs()
    if (off > 0.05).any():
        bad = runs.loc[off > 0.05, "name"].tolist()
        raise ValueError(f"verify: runs {bad} are not at the predicted budget C={C:.3g} (more than 5% off); "
                         "score only the verification sweep's runs")
    est = prediction["estimates"]
    a3 = Approach3Fit(E=est["approach3.E"], A=est["approach3.A"], B=est["approach3.B"], alpha=est["approach3.alpha"],
                      beta=est["approach3.beta"], n_points=0, objective=float("nan"), method="committed")
    pred = prediction["prediction"]
    N_pred, L_pred = float(pred["N_opt"]), float(pred["L_opt"])
    cols = ["name", "N", "D", "C", "loss"] + (["seed"] if "seed" in runs else [])
    table = runs[cols].sort_values(["N", "name"]).reset_index(drop=True)
    table["N_over_predicted"] = table["N"] / N_pred
    table["L_approach3"] = a3(table["N"], table["D"])
    table["rel_error_approach3"] = (table["L_approach3"] - table["loss"]) / table["loss"]
    # one row per size: its replicates grouped as the seed-noise analysis groups them (analysis.checks.seeds)
    sizes = [{"name": _common_name(z["runs"]), "N": z["N"], "D": z["D"], "loss": z["loss"],
              "loss_std": None if z["n"] < 2 else z[SIGMA], "n_seeds": int(z["n"]), "runs": z["runs"],
              "N_over_predicted": z["N"] / N_pred}
             for z in replicate_points(table).sort_values(["N", "D"]).to_dict("records")]
    best = min(sizes, key=lambda r: r["loss"])
    nearest = min(sizes, key=lambda r: abs(math.log(r["N"] / N_pred)))
    lo, hi = prediction["prediction_ci95"]["L_opt"]
    return {
        "C": C, "headline": prediction.get("headline"),
        "predicted": {"N_opt": N_pred, "D_opt": float(pred["D_opt"]), "L_opt": L_pred, "L_opt_ci95": [lo, hi],
                      "N_opt_ci95": list(prediction["prediction_ci95"]["N_opt"])},
        "best": {k: best[k] for k in ("name", "N", "D", "loss", "loss_std", "n_seeds")},
        "rel_error_L_opt": (L_pred - best["loss"]) / best["loss"],
        "best_inside_L_ci95": bool(lo <= best["loss"] <= hi),
        "best_is_nearest_predicted_N": bool(best["name"] == nearest["name"]),
        "nearest": {"name": nearest["name"], "N": nearest["N"], "loss": nearest["loss"]},
        "sizes": sizes,
        "runs": table.to_dict("records"),
    }


def _common_name(names: list[str]) -> str:
    """A size's name from its replicates' names: `run-s0`, `run-s1` -> `run` (one run: its own name)."""
    if len(names) == 1:
        return names[0]
    stems = {n.rsplit("-s", 1)[0] if n.rsplit("-s", 1)[-1].isdigit() else n for n in names}
    return stems.pop() if len(stems) == 1 else "+".join(names)


def _g(x: float) -> str:
    return f"{x:.4g}"


def _backtest_lines(bt: dict | None) -> list[str]:
    if not bt:
        return []
    if "error" in bt:
        return [f"Backtest: not possible ({bt['error']}).", ""]
    obs = bt["observed"]
    lines = [f"Backtest (fit C = {', '.join(f'{c:.3g}' for c in bt['fitted_budgets'])}, predict the IsoFLOP minimum at "
             f"C = {bt['C']:.3g}: N_opt = {_g(obs['N_opt'])}, L = {obs['L_opt']:.4f}):"]
    for k in PREDICT_APPROACHES:
        r = bt.get(k, {})
        by_form = r.get("rel_error_L_by_form")
        forms = "" if not by_form else " (L_opt(C) " + ", ".join(f"{f} {e:+.2%}" for f, e in by_form.items()) + ")"
        lines.append(f"- {k}: " + (f"not fitted ({r['error']})" if "error" in r else
                     f"N_opt {_g(r['N_opt'])} ({r['rel_error_N']:+.1%}), L_opt {r['L_opt']:.4f} "
                     f"({r['rel_error_L']:+.2%})" + forms))
    return lines + [""]


def _form_lines(p: dict) -> list[str]:
    """Approach 2's L_opt under each form of L(C), so the spread the choice of form makes is in every prediction."""
    est, ci = p["estimates"], p["ci95"]
    if "approach2.L_opt_pure" not in est:  # a prediction.json written before the forms were reported
        return []
    forms = [f for f in FORM_KEYS if f"approach2.L_opt_{f}" in est]
    cells = {f: f"{f} {_g(est[f'approach2.L_opt_{f}'])} [{_g(ci[f'approach2.L_opt_{f}'][0])}, "
                f"{_g(ci[f'approach2.L_opt_{f}'][1])}]" for f in forms}
    spread = est["approach2.L_opt_irreducible"] / est["approach2.L_opt_pure"] - 1
    how = {"irreducible": "the irreducible form", "pure": "the pure power law",
           "average": "the mean of the irreducible and pure forms, its interval joining theirs",
           "local": "the local form"}[p.get("l_form", "irreducible")]
    local = (f", {cells['local']} (a line in log C through the minima of the top doubling of budgets)"
             if "local" in cells else "")
    return [f"Approach 2's L_opt(C) through the IsoFLOP minima: {cells['irreducible']} (E_C + (C_c/C)^alpha_C, E_C = "
            f"{_g(est['approach2.E_C'])}), {cells['pure']} ((C_c/C)^alpha_C){local}; the irreducible and pure forms "
            f"differ by {spread:+.2%} here. Approach 2's L_opt is {how}.", ""]


def _horizon_lines(p: dict) -> list[str]:
    """The backtest at each horizon beside the prediction's own (C over the largest fitted budget)."""
    hz = p.get("backtest_horizons") or []
    if len(hz) < 2:
        return []
    rows = ["| horizon | fitted budgets | observed L | approach2 L_opt (irreducible / pure / local) | approach3 |",
            "|---|---|---|---|---|"]
    for b in hz:
        a2, a3 = b.get("approach2", {}), b.get("approach3", {})
        forms = a2.get("rel_error_L_by_form", {})
        c2 = (f"{a2['rel_error_L']:+.2%} (" + " / ".join(f"{forms[f]:+.2%}" for f in FORM_KEYS if f in forms) + ")"
              if "rel_error_L" in a2 else "not fitted")
        c3 = f"{a3['rel_error_L']:+.2%}" if "rel_error_L" in a3 else "not fitted"
        rows.append(f"| {b['horizon']:.3g}x | {len(b['fitted_budgets'])} ({b['fitted_budgets'][0]:.3g} to "
                    f"{b['fitted_budgets'][-1]:.3g}) | {b['observed']['L_opt']:.4f} | {c2} | {c3} |")
    return [f"The same backtest at longer horizons (the prediction extrapolates {p['C_over_largest_budget']:.3g}x; "
            "loss errors on the largest budget's IsoFLOP minimum):", "", *rows, ""]


def prediction_markdown(p: dict) -> str:
    est, ci = p["estimates"], p["ci95"]
    unit = TARGETS.get(p["conventions"].get("target", "loss"), TARGETS["loss"])
    rows = [f"| approach | N_opt | D_opt | L_opt ({unit}) |", "|---|---|---|---|"]
    for key in PREDICT_APPROACHES:
        cells = []
        for k in ("N_opt", "D_opt", "L_opt"):
            lo, hi = ci[f"{key}.{k}"]
            cells.append(f"{_g(est[f'{key}.{k}'])} [{_g(lo)}, {_g(hi)}]")
        rows.append(f"| {key}{' (headline)' if key == p['headline'] else ''} | " + " | ".join(cells) + " |")
    pred, pci = p["prediction"], p["prediction_ci95"]
    G, a = p["prior_fit"]
    n_conv = p["conventions"].get("N", "non_embedding")  # prior_fit's N: the planner must read it in the same one
    n_convention = "" if n_conv == "non_embedding" else f", `plan.n_convention={n_conv}` (the fit's N)"
    conv = ", ".join(f"{k}: {v}" for k, v in p["conventions"].items())
    return "\n".join([
        f"# Prediction at C = {p['C']:.3g} FLOPs ({p['C_over_largest_budget']:.3g}x the largest fitted budget)",
        "",
        f"Committed: N_opt = {_g(pred['N_opt'])} [{_g(pci['N_opt'][0])}, {_g(pci['N_opt'][1])}], "
        f"D_opt = {_g(pred['D_opt'])} [{_g(pci['D_opt'][0])}, {_g(pci['D_opt'][1])}] tokens, "
        f"L_opt = {_g(pred['L_opt'])} [{_g(pci['L_opt'][0])}, {_g(pci['L_opt'][1])}] {unit} "
        f"({p['headline']}; 95% bootstrap intervals over {p['n_resamples']} resamples of {p['n_runs']} runs, "
        f"{p['n_failed']} failed).",
        "",
        *rows,
        "",
        f"Approach 2 also predicts L at its own N_opt with the Approach 3 fit: "
        f"{_g(est['approach2.L_opt_by_approach3'])} [{_g(ci['approach2.L_opt_by_approach3'][0])}, "
        f"{_g(ci['approach2.L_opt_by_approach3'][1])}]. Exponents: Approach 2 a = {_g(est['approach2.a'])} "
        f"[{_g(ci['approach2.a'][0])}, {_g(ci['approach2.a'][1])}], b = {_g(est['approach2.b'])}; Approach 3 "
        f"alpha = {_g(est['approach3.alpha'])}, beta = {_g(est['approach3.beta'])}, E = {_g(est['approach3.E'])}, "
        f"and along the budget line N_opt ~ C^{_g(est['approach3.a_local'])} "
        f"[{_g(ci['approach3.a_local'][0])}, {_g(ci['approach3.a_local'][1])}] near C.",
        "",
        *_form_lines(p),
        *_backtest_lines(p.get("backtest")),
        *_horizon_lines(p),
        f"D_opt is C / f(N_opt) with f the family's FLOPs per token read off the runs (conventions: {conv}).",
        f"To train it and its neighbours at 0.5x and 2x N: `hydra.sweeper.plan.prior_fit=[{G:.6g},{a:.6g}]` with "
        f"`plan.budgets=[{p['C']:g}]`, `plan.n_sizes=3`, `plan.size_step=2`{n_convention}.",
        "",
    ])


def verification_markdown(v: dict) -> str:
    p = v["predicted"]
    rows = ["| run | N | N / predicted | D | loss | Approach 3 L(N, D) | rel. error |", "|---|---|---|---|---|---|---|"]
    for r in v["runs"]:
        rows.append(f"| {r['name']} | {_g(r['N'])} | {r['N_over_predicted']:.2f} | {_g(r['D'])} | {r['loss']:.4f} | "
                    f"{r['L_approach3']:.4f} | {r['rel_error_approach3']:+.2%} |")
    sizes = v.get("sizes", [])
    seeds = ["| size | N / predicted | seeds | mean loss | seed std | predicted L_opt vs mean |", "|---|---|---|---|---|---|"]
    for z in sizes:
        std = "" if z["loss_std"] is None else f"{z['loss_std']:.4f}"
        seeds.append(f"| {z['name']} | {z['N_over_predicted']:.2f} | {z['n_seeds']} | {z['loss']:.4f} | {std} | "
                     f"{(p['L_opt'] - z['loss']) / z['loss']:+.2%} |")
    replicated = any(z["n_seeds"] > 1 for z in sizes)
    return "\n".join([
        f"# Verification at C = {v['C']:.3g} FLOPs",
        "",
        f"Predicted ({v['headline']}): N_opt = {_g(p['N_opt'])}, L_opt = {p['L_opt']:.4f} "
        f"[{p['L_opt_ci95'][0]:.4f}, {p['L_opt_ci95'][1]:.4f}]. Best observed: {v['best']['name']} "
        f"(N = {_g(v['best']['N'])}), loss {v['best']['loss']:.4f}"
        + (f" (mean of {v['best']['n_seeds']} seeds)." if v["best"].get("n_seeds", 1) > 1 else "."),
        "",
        f"- Relative error of the predicted loss vs the best {'size (seed mean)' if replicated else 'run'}: "
        f"**{v['rel_error_L_opt']:+.2%}**; the best loss is {'inside' if v['best_inside_L_ci95'] else 'outside'} "
        "the 95% interval.",
        f"- The best {'size' if replicated else 'of the runs'} is {'' if v['best_is_nearest_predicted_N'] else 'not '}"
        f"the one nearest the predicted N_opt ({v['nearest']['name']}).",
        "",
        *(seeds + [""] if replicated else []),
        *rows,
        "",
    ])

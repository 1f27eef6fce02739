"""Downstream scaling: task accuracy against loss, against scale through the loss law, and its backtest.

The two-step prediction of Bhagia et al. 2024 ("Establishing Task Scaling Laws via Compute-Efficient Model Ladders",
arXiv:2412.04403; its steps 1 and 2), fitted on the evaluated runs of a sweep:
  step 1, a loss from the scale: L(N, D) = E + A / N^alpha + B / D^beta (their step 1, Hoffmann et al. 2022 eq. 2;
    analysis.laws.approach3), or, when N and D do not vary apart (a ladder at one tokens-per-parameter ratio), the
    frontier law L(C) = E + (C_c / C)^alpha_C (Kaplan et al. 2020 eq. 1.3 with an irreducible term; analysis.laws.fits);
  step 2, accuracy from that loss, their sigmoid Acc(L) = a / (1 + exp(-k (L - L0))) + b, written here as
    acc(L) = floor + (ceiling - floor) * sigmoid(-k (L - L0)),   k > 0 (their k is -k here),
  with the floor b fixed at the task's chance level (Bhagia et al. fit it; a model that knows nothing scores chance,
  and the few small runs of a CPU sweep cannot pin a free floor) and the ceiling fitted in [floor, 1] or fixed at 1.
Step 2 is fitted on the observed (loss, accuracy) pairs, step 1 on the observed losses; a prediction chains them.

The loss of step 2 (`x`) is the run's validation loss ("loss": the general loss that Gadre et al. 2024, "Language models
scale reliably with over-training and on downstream tasks", relate to average top-1 error as Err(L) = eps - k
exp(-gamma L); that exponential is not implemented here) or the task loss, minus the mean log-likelihood of the correct
answer ("task_loss": Bhagia et al.'s intermediate). Intervals: percentile bootstrap over runs
(analysis.checks.uncertainty).
The emergence view (Schaeffer et al. 2023: a discontinuous metric such as accuracy can make smooth improvement look
sudden) is drawn by analysis.report.downstream_plots, accuracy beside the continuous log-likelihood.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
from scipy import optimize, special

from analysis.checks.uncertainty import bootstrap
from analysis.laws.approach3 import Approach3Fit, TokenCost, constrained_optimum, fit_approach3_vpnls
from analysis.laws.fits import KaplanFit, fit_kaplan, lower_envelope
from analysis.load import EVAL_COLUMN, usable
from analysis.validate import check_min_points

METRICS = ("acc", "acc_norm")  # accuracy (argmax of summed log-likelihood) or its length-normalized variant
XS = ("loss", "task_loss")  # step 2's loss: the validation loss or minus the log-likelihood of the correct answer
LAWS = ("auto", "approach3", "kaplan_C")
HOLDS = ("N", "C")
MIN_LIFT = 0.02  # accuracy points above chance below which a task "stays at chance" (no sigmoid is identified)
FIX = "evaluate the runs first (python -m scaling.evaluate RUN_DIR, or train with eval=offline), then collect again"


# --------------------------------------------------------------------------------------------------------------------
# The evaluated runs of a task
# --------------------------------------------------------------------------------------------------------------------
def eval_tasks(df: pd.DataFrame) -> list[str]:
    """Tasks with an eval_<task>_acc column holding at least one number."""
    return sorted({m["task"] for c in df.columns if (m := EVAL_COLUMN.match(c)) and m["field"] == "acc"
                   and df[c].notna().any()})


def task_points(df: pd.DataFrame, task: str, metric: str = "acc") -> pd.DataFrame:
    """The usable runs evaluated on `task`: name, N, D, C, loss, acc (the chosen metric), logprob, task_loss, chance."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is unknown; use one of {list(METRICS)}")
    tasks = eval_tasks(df)
    if not tasks:
        raise ValueError(f"the run table has no evaluation columns (eval_<task>_acc); {FIX}")
    if task not in tasks:
        raise ValueError(f"task {task!r} has no evaluation columns in the run table; evaluated tasks: {tasks}")
    col = f"eval_{task}_{metric}"
    if col not in df.columns or df[col].isna().all():
        raise ValueError(f"task {task!r} has no {metric} (an exact-match task has accuracy only); use metric acc")
    runs = usable(df)
    pts = pd.DataFrame({"name": runs["name"], "N": runs["N"], "D": runs["D"], "C": runs["C"], "loss": runs["loss"],
                        "acc": runs[col], "logprob": runs.get(f"eval_{task}_logprob", np.nan),
                        "chance": runs.get(f"eval_{task}_chance", np.nan)})
    pts["task_loss"] = -pts["logprob"]
    return pts[pts["acc"].notna()].reset_index(drop=True)


def task_chance(pts: pd.DataFrame, task: str) -> float:
    """The task's one chance level (its eval_<task>_chance column)."""
    chance = pts["chance"].dropna().unique()
    if len(chance) == 0:
        raise ValueError(f"task {task!r}: no eval_{task}_chance column; give the floor explicitly (floor=..., "
                         "--floor) or re-evaluate the runs")
    if np.ptp(chance) > 1e-9:
        raise ValueError(f"task {task!r}: runs carry different chance levels {sorted(chance)}; they were evaluated "
                         "with different task settings (choices, shots): re-evaluate them alike")
    return float(chance[0])


# --------------------------------------------------------------------------------------------------------------------
# Step 2: accuracy from loss
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AccuracyFit:
    """acc(L) = floor + (ceiling - floor) * sigmoid(-k (L - L0)) (Bhagia et al. 2024, step 2, floor fixed)."""

    floor: float
    ceiling: float
    k: float
    L0: float
    n_points: int
    rmse: float
    ceiling_fixed: bool

    def __call__(self, L):
        return self.floor + (self.ceiling - self.floor) * special.expit(-self.k * (np.asarray(L, float) - self.L0))

    def as_dict(self) -> dict:
        return {"floor": self.floor, "ceiling": self.ceiling, "k": self.k, "L0": self.L0, "n_points": self.n_points,
                "rmse": self.rmse, "ceiling_fixed": self.ceiling_fixed}


def fit_accuracy(L, acc, *, floor: float, ceiling: float | None = None, min_lift: float = MIN_LIFT) -> AccuracyFit:
    """Least squares of the step-2 sigmoid through (L, acc), from a few starts (L0 at quantiles of L, slopes spanning
    two decades): the objective has flat valleys (a sigmoid seen only on one side), and one start can stop in one.
    `ceiling` None fits it in [floor, 1]; a number fixes it."""
    L, acc = np.asarray(L, float).ravel(), np.asarray(acc, float).ravel()
    if len(L) != len(acc):
        raise ValueError(f"accuracy fit: {len(L)} losses and {len(acc)} accuracies; give one of each per run")
    if not (np.isfinite(L).all() and np.isfinite(acc).all()):
        raise ValueError("accuracy fit: a loss or accuracy is NaN; drop the runs that were not evaluated")
    if not 0 <= floor < 1:
        raise ValueError(f"accuracy fit: floor (chance level) {floor!r} must lie in [0, 1)")
    if ceiling is not None and not floor < ceiling <= 1:
        raise ValueError(f"accuracy fit: ceiling {ceiling!r} must lie in (floor={floor:g}, 1]")
    check_min_points(len(L), 3 if ceiling is not None else 4,
                     f"accuracy sigmoid ({2 if ceiling is not None else 3} parameters)")
    if acc.max() - floor < min_lift:
        raise ValueError(f"accuracy fit: all {len(acc)} runs score at chance (best {acc.max():.3f}, chance "
                         f"{floor:.3f}): the sigmoid's slope and midpoint are not identified; train larger or longer "
                         "runs, or choose a task that rises above chance")
    span = float(np.ptp(L))
    if span <= 0:
        raise ValueError(f"accuracy fit: every run has the same loss ({L[0]:g}); runs of different sizes are needed")

    def resid(p):
        k, L0 = p[0], p[1]
        top = ceiling if ceiling is not None else p[2]
        return floor + (top - floor) * special.expit(-k * (L - L0)) - acc

    lo = [1e-3 / span, L.min() - 5 * span] + ([] if ceiling is not None else [floor])
    hi = [1e3 / span, L.max() + 5 * span] + ([] if ceiling is not None else [1.0])
    top0 = float(np.clip(acc.max() + 0.05, floor + 1e-3, 1 - 1e-6))
    best = None
    for L0 in np.quantile(L, [0.1, 0.5, 0.9]):
        for k in np.array([1.0, 4.0, 16.0]) / span:
            p0 = [k, L0] + ([] if ceiling is not None else [top0])
            r = optimize.least_squares(resid, p0, bounds=(lo, hi), method="trf", x_scale="jac", max_nfev=2000)
            if best is None or r.cost < best.cost:
                best = r
    k, L0 = best.x[:2]
    top = ceiling if ceiling is not None else best.x[2]
    return AccuracyFit(floor=float(floor), ceiling=float(top), k=float(k), L0=float(L0), n_points=len(L),
                       rmse=float(np.sqrt(2 * best.cost / len(L))), ceiling_fixed=ceiling is not None)


# --------------------------------------------------------------------------------------------------------------------
# Step 1: the loss law
# --------------------------------------------------------------------------------------------------------------------
def resolve_law(pts: pd.DataFrame, law: str) -> str:
    """auto: Approach 3 when N and D vary apart over 6+ runs, else the frontier law L(C)."""
    if law not in LAWS:
        raise ValueError(f"loss law {law!r} is unknown; use one of {list(LAWS)}")
    if law != "auto":
        return law
    logN, logD = np.log(pts["N"].to_numpy(float)), np.log(pts["D"].to_numpy(float))
    apart = len(pts) >= 6 and np.ptp(logN) > 0 and np.ptp(logD) > 0 and abs(np.corrcoef(logN, logD)[0, 1]) < 0.99
    return "approach3" if apart else "kaplan_C"


@dataclasses.dataclass(frozen=True)
class LossLaw:
    kind: str  # "approach3" (L(N, D)) or "kaplan_C" (L(C) on the frontier)
    fit: Approach3Fit | KaplanFit
    cost: TokenCost | None  # approach3: FLOPs per token over N (the family's budget line); None: one k = C/(N D)
    N_range: tuple[float, float]

    def at_run(self, N, D, C):
        return self.fit(N, D) if self.kind == "approach3" else self.fit(C)

    def at_C(self, C: float) -> float:
        """The loss of the compute-optimal run at C (approach3: on the family's budget line D = C / f(N))."""
        if self.kind == "kaplan_C":
            return float(self.fit(C))
        if self.cost is not None:
            return constrained_optimum(self.fit, C, self.cost, self.N_range)[2]
        return float(self.fit.L_opt(C))

    def as_dict(self) -> dict:
        d = self.fit.as_dict()
        return {"kind": self.kind, **{k: v for k, v in d.items() if isinstance(v, (int, float, str))}}


def fit_loss_law(pts: pd.DataFrame, y: str, kind: str, init: tuple | None = None) -> LossLaw:
    """Step 1 on column `y` (loss or task_loss) of the runs."""
    Y = pts[y].to_numpy(float)
    if not (np.isfinite(Y).all() and (Y > 0).all()):
        raise ValueError(f"loss law: column {y} has missing or non-positive values"
                         + ("; task_loss needs eval_<task>_logprob for every run" if y == "task_loss" else ""))
    N_range = (float(pts["N"].min()) / 30, float(pts["N"].max()) * 30)
    if kind == "kaplan_C":
        C, L = lower_envelope(pts["C"], Y)
        check_min_points(len(C), 3, "loss law L(C) on the compute frontier")
        return LossLaw(kind, fit_kaplan(C, L, variable="C", irreducible=len(C) >= 4), None, N_range)
    fpt = (pts["C"] / (pts["N"] * pts["D"])).to_numpy(float)
    # Variable projection, not the paper's Huber/L-BFGS grid: ~100x faster on a few runs (0.03 s against 2-20 s on
    # 15 runs), which a bootstrap of both steps needs; the two agree on clean data (analysis.laws.approach3).
    a3 = fit_approach3_vpnls(pts["N"], pts["D"], Y, init=init, flops_per_token=float(np.median(fpt)))
    # As analysis.report: one k describes the runs to within 25%, else the optimum lies on the family's budget line.
    cost = TokenCost.from_runs(pts) if fpt.max() / fpt.min() > 1.25 else None
    return LossLaw(kind, a3, cost, N_range)


def _a3_init(law: LossLaw) -> tuple | None:
    f = law.fit
    return (f.E, f.A, f.B, f.alpha, f.beta) if isinstance(f, Approach3Fit) else None


# --------------------------------------------------------------------------------------------------------------------
# The two steps chained, as a picklable bootstrap statistic
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TwoStepStat:
    """Both steps fitted on a run table; returns the sigmoid's parameters and, for each target run (N, D, C) and
    each budget C, the predicted loss and accuracy."""

    x: str
    law: str  # resolved: approach3 or kaplan_C
    floor: float
    ceiling: float | None = None
    targets: tuple[tuple[float, float, float], ...] = ()
    budgets: tuple[float, ...] = ()
    init: tuple | None = None  # approach3 warm start (E, A, B, alpha, beta)

    def fit(self, pts: pd.DataFrame) -> tuple[LossLaw, AccuracyFit]:
        law = fit_loss_law(pts, self.x, self.law, self.init)
        return law, fit_accuracy(pts[self.x], pts["acc"], floor=self.floor, ceiling=self.ceiling)

    def __call__(self, pts: pd.DataFrame) -> dict:
        law, acc = self.fit(pts)
        out = {k: getattr(acc, k) for k in ("ceiling", "k", "L0")}
        for i, (N, D, C) in enumerate(self.targets):
            L = float(law.at_run(N, D, C))
            out.update({f"L@{i}": L, f"acc@{i}": float(acc(L))})
        for C in self.budgets:
            L = law.at_C(C)
            out.update({f"L@C={C:.6g}": L, f"acc@C={C:.6g}": float(acc(L))})
        return out


def _bootstrapped(pts: pd.DataFrame, stat: TwoStepStat, n_bootstrap: int, seed: int,
                  n_jobs: int) -> tuple[dict, dict, int, int]:
    """(estimate, 95% intervals (empty without resamples), resamples fitted, resamples whose fit failed)."""
    if n_bootstrap <= 0:
        return stat(pts), {}, 0, 0
    b = bootstrap(pts, stat, n_resamples=n_bootstrap, seed=seed, n_jobs=n_jobs)
    return b.estimate, b.ci, len(b.samples), b.n_failed


def backtest_downstream(pts: pd.DataFrame, *, x: str = "loss", law: str = "auto", floor: float,
                        ceiling: float | None = None, hold: str = "N", n_bootstrap: int = 200, seed: int = 0,
                        n_jobs: int = 2) -> dict:
    """Fit both steps on all runs but the largest N (or C) and predict the held-out runs' accuracy, with a bootstrap
    interval over the fitted runs. Errors in accuracy points (100 x fraction); `acc_step2` predicts from the run's
    observed loss (step 2 alone), separating the sigmoid's error from the loss law's."""
    if hold not in HOLDS:
        raise ValueError(f"backtest: hold {hold!r} is unknown; hold out the largest N or C ({list(HOLDS)})")
    top = float(pts[hold].max())
    held = np.isclose(pts[hold], top, rtol=1e-6)
    train, test = pts[~held].reset_index(drop=True), pts[held].reset_index(drop=True)
    if len(train) < 4 or train["N"].nunique() < 2:
        raise ValueError(f"backtest: holding out the largest {hold} ({top:.3g}) leaves {len(train)} run(s) of "
                         f"{train['N'].nunique()} size(s) to fit; need 4+ runs of 2+ sizes below it")
    kind = resolve_law(train, law)
    targets = tuple((float(r.N), float(r.D), float(r.C)) for r in test.itertuples())
    full = TwoStepStat(x=x, law=kind, floor=floor, ceiling=ceiling, targets=targets)
    law_fit, acc_fit = full.fit(train)
    stat = dataclasses.replace(full, init=_a3_init(law_fit))
    est, ci, _, _ = _bootstrapped(train, stat, n_bootstrap, seed, n_jobs)
    rows = []
    for i, r in enumerate(test.itertuples()):
        lo_hi = ci.get(f"acc@{i}")
        pred = est[f"acc@{i}"]
        rows.append({"name": r.name, "N": r.N, "D": r.D, "C": r.C, "L_observed": float(getattr(r, x)),
                     "L_predicted": est[f"L@{i}"], "acc_observed": float(r.acc), "acc_predicted": pred,
                     "acc_ci95": lo_hi, "acc_step2": float(acc_fit(getattr(r, x))),
                     "abs_error_points": 100 * abs(pred - r.acc),
                     "inside_ci95": None if lo_hi is None else bool(lo_hi[0] <= r.acc <= lo_hi[1])})
    return {"hold": hold, "held_out": top, "n_fit": len(train), "law": kind, "runs": rows,
            "mean_abs_error_points": float(np.mean([r["abs_error_points"] for r in rows])),
            "all_inside_ci95": None if not ci else all(r["inside_ci95"] for r in rows)}


def analyze_task(df: pd.DataFrame, task: str, *, metric: str = "acc", x: str = "loss", law: str = "auto",
                 floor: float | None = None, ceiling: float | None = None, predict_C: float | None = None,
                 hold: str = "N", n_bootstrap: int = 200, seed: int = 0, n_jobs: int = 2) -> dict:
    """Step 2 on all evaluated runs of `task`, step 1 chained to it, the prediction at `predict_C` (the compute-optimal
    run there; default 10x the largest run's C) with 95% bootstrap intervals, and the backtest on the largest `hold`."""
    if x not in XS:
        raise ValueError(f"x {x!r} is unknown; use one of {list(XS)} (validation loss or the task's own loss)")
    pts = task_points(df, task, metric)
    floor = task_chance(pts, task) if floor is None else float(floor)
    check_min_points(len(pts), 4, f"downstream fit of task {task!r} (evaluated usable runs)")
    if predict_C is not None and not (math.isfinite(predict_C) and predict_C > 0):
        raise ValueError(f"predict_C {predict_C!r}: give a positive number of FLOPs, e.g. 10x the largest run's C")
    C = float(predict_C if predict_C is not None else pts["C"].max() * 10)
    kind, note = resolve_law(pts, law), None
    full = TwoStepStat(x=x, law=kind, floor=floor, ceiling=ceiling, budgets=(C,))
    try:
        law_fit, acc_fit = full.fit(pts)
        law_fit.at_C(C)
    except ValueError as exc:
        if law != "auto" or kind != "approach3":
            raise
        # auto chose L(N, D), whose fit has no compute-optimal run at C (e.g. its loss falls towards the smallest N
        # searched): the frontier law L(C) needs no such optimum, so auto falls back to it and says why.
        note = f"Approach 3 gave no prediction ({exc}); step 1 fell back to the frontier law L(C)"
        kind, law = "kaplan_C", "kaplan_C"
        full = dataclasses.replace(full, law=kind)
        law_fit, acc_fit = full.fit(pts)
    est, ci, n_res, n_failed = _bootstrapped(pts, dataclasses.replace(full, init=_a3_init(law_fit)), n_bootstrap,
                                             seed, n_jobs)
    key = f"C={C:.6g}"
    out = {"task": task, "metric": metric, "x": x, "chance": floor, "n_runs": len(pts),
           "max_acc": float(pts["acc"].max()), "accuracy_fit": acc_fit.as_dict(), "loss_law": law_fit.as_dict(),
           "accuracy_fit_ci95": {k: ci[k] for k in ("ceiling", "k", "L0") if k in ci},
           "prediction": {"C": C, "L": est[f"L@{key}"], "acc": est[f"acc@{key}"], "L_ci95": ci.get(f"L@{key}"),
                          "acc_ci95": ci.get(f"acc@{key}")},
           "n_resamples": n_res, "n_failed": n_failed, **({"law_note": note} if note else {})}
    try:
        out["backtest"] = backtest_downstream(pts, x=x, law=law, floor=floor, ceiling=ceiling, hold=hold,
                                              n_bootstrap=n_bootstrap, seed=seed, n_jobs=n_jobs)
    except ValueError as exc:
        out["backtest"] = {"error": str(exc)}
    return out


def analyze_all(df: pd.DataFrame, tasks: list[str] | None = None, **kw) -> list[dict]:
    """`analyze_task` for each task (default: every evaluated one); a task that cannot be fitted gets its reason."""
    tasks = tasks or eval_tasks(df)
    if not tasks:
        raise ValueError(f"the run table has no evaluation columns (eval_<task>_acc); {FIX}")
    out = []
    for t in tasks:
        try:
            out.append(analyze_task(df, t, **kw))
        except ValueError as exc:
            out.append({"task": t, "error": str(exc)})
    return out


# --------------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------------
def _ci(v: list | None, scale: float = 1.0, fmt: str = ".1f") -> str:
    return f" [{v[0] * scale:{fmt}}, {v[1] * scale:{fmt}}]" if v else ""


def task_lines(r: dict) -> list[str]:
    """One task's fit, prediction and backtest as Markdown bullets (the report section and the CLI print these)."""
    if "error" in r:
        return [f"- **{r['task']}**: not fitted: {r['error']}"]
    f, ci, p, law = r["accuracy_fit"], r["accuracy_fit_ci95"], r["prediction"], r["loss_law"]
    xname = "validation loss" if r["x"] == "loss" else "task loss (-log-likelihood of the correct answer)"
    law_text = (f"L(N, D) = {law['E']:.3g} + {law['A']:.3g}/N^{law['alpha']:.3g} + {law['B']:.3g}/D^{law['beta']:.3g}"
                if law["kind"] == "approach3" else
                f"L(C) = {law['E']:.3g} + ({law['C_c']:.3g}/C)^{law['alpha_C']:.3g} (compute frontier)")
    L = [f"- **{r['task']}** ({r['metric']}, {r['n_runs']} runs, chance {100 * r['chance']:.1f}%, best "
         f"{100 * r['max_acc']:.1f}%): acc(L) = {100 * f['floor']:.1f}% + ({100 * f['ceiling']:.1f}%"
         f"{_ci(ci.get('ceiling'), 100)} - floor) * sigmoid(-{f['k']:.3g}{_ci(ci.get('k'), 1, '.3g')} "
         f"(L - {f['L0']:.3f}{_ci(ci.get('L0'), 1, '.3f')})) on the {xname}; rmse {100 * f['rmse']:.2f} points",
         f"  - step 1: {law_text}" + (f" ({r['law_note']})" if r.get("law_note") else ""),
         f"  - predicted at C = {p['C']:.3g}: L = {p['L']:.3f}{_ci(p['L_ci95'], 1, '.3f')}, accuracy "
         f"{100 * p['acc']:.1f}%{_ci(p['acc_ci95'], 100)}"]
    bt = r.get("backtest") or {}
    if "error" in bt:
        L.append(f"  - backtest: not possible ({bt['error']})")
    elif bt:
        L.append(f"  - backtest (fit {bt['n_fit']} runs below the largest {bt['hold']} = {bt['held_out']:.3g}, "
                 f"law {bt['law']}): mean absolute error {bt['mean_abs_error_points']:.1f} accuracy points")
        for h in bt["runs"]:
            inside = "" if h["inside_ci95"] is None else (", inside the interval" if h["inside_ci95"] else
                                                           ", outside the interval")
            L.append(f"    - {h['name']}: observed {100 * h['acc_observed']:.1f}%, predicted "
                     f"{100 * h['acc_predicted']:.1f}%{_ci(h['acc_ci95'], 100)} (error {h['abs_error_points']:.1f} "
                     f"points{inside}; from its observed loss {100 * h['acc_step2']:.1f}%)")
    return L


def markdown_section(results: list[dict] | None) -> list[str]:
    """The report's "Downstream" section (none without evaluated runs)."""
    if not results:
        return []
    return ["", "## Downstream", "",
            "Two-step prediction (Bhagia et al. 2024): step 1 the loss from the scale (Approach 3's L(N, D), or L(C) "
            "on the compute frontier when N and D do not vary apart), step 2 the accuracy from the loss, a sigmoid "
            "from the task's chance level (fixed) to a fitted ceiling. Intervals: 95% bootstrap over runs. The "
            "backtest fits the runs below the largest size and predicts the largest. The emergence figure puts "
            "accuracy beside the continuous log-likelihood of the correct answer (Schaeffer et al. 2023).", ""] + [
        line for r in results for line in task_lines(r)]

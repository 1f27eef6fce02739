"""Extrapolation quality: fit L(N, D) on small models, predict models 10-20x larger in N, compare fitting choices.

The harness (`extrapolation_backtest`) fits Chinchilla's L = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022 eq. 2)
on the model sizes N <= N_max / r and scores the predicted loss of the final checkpoints of every size at least
`min_ratio` (10) times the largest fitted one: |L_pred - L_true| / L_true per held-out run and their mean. Each fitting
choice the literature argues over is one field of `FitChoice`:

  method     "huber": Huber (delta 1e-3) on log loss, L-BFGS from the paper's grid (Hoffmann et al. 2022 app. D.2);
             "vpnls": squared error on loss, (E, A, B) by NNLS per exponent pair (analysis.laws.approach3).
  weights    "none"; "inverse_variance": 1/sigma^2 per point (Aitken 1935), sigma from a `loss_sd` column (seed
             replicates) or else each size's checkpoint-to-checkpoint noise (Gasser et al. 1986, `curve_noise`);
             "compute": w proportional to C = 6ND, the large runs nearest the target count most.
  checkpoints  None: final checkpoints only (one point per run, as Hoffmann et al. 2022 Approach 3); a fraction f:
             also every intermediate checkpoint past f of its run as an extra (N, D) point (Choshen, Zhang & Andreas
             2024, "A Hitchhiker's Guide to Scaling Law Estimation", arXiv 2410.11840: fitting intermediate
             checkpoints, not only final losses, "substantially improves accuracy" (abstract); their guide discards
             the earliest, before 10B tokens); 0.0: every checkpoint.
  frontier   None, or a tolerance t: keep only points within t of the best loss reached at no more compute (the
             compute-efficient frontier, Kaplan et al. 2020 fig. 1 / Hoffmann et al. 2022 sec. 3.1's envelope).
  drop_smallest  leave out the k smallest model sizes (Choshen et al. 2024 find predictions most accurate from
             models of sizes near the target's (abstract)).
  tie_exponents  alpha = beta (Gadre et al. 2024, "Language models scale reliably with over-training and on
             downstream tasks", arXiv 2403.08540, sec. 2: with one exponent L depends on C and the token multiplier
             M = D/N alone).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize
from threadpoolctl import threadpool_limits

# The tied fits reuse approach3's objective and its NNLS inner solve with beta = alpha, so the two fitters cannot drift.
from analysis.laws.approach3 import (GRID_Sx5, Approach3Fit, _huber_lse_batch, _huber_lse_objective, _vp_inner,
                                     fit_approach3, fit_approach3_vpnls)
from analysis.laws.fits import relative_weights
from analysis.validate import check_min_points, check_positive_finite

METHODS = ("huber", "vpnls")
# L-BFGS starts from the best grid points of Hoffmann's grid. On the testbed (ratio 10, final checkpoints) the best six
# of 32 reached one optimum (objectives equal to 1e-13), and with 8 rather than 32 the table of ~30 choices x 3 ratios
# runs in minutes on 2 cores.
N_STARTS = 8
WEIGHTS = ("none", "inverse_variance", "compute")
CHI2_1_MEDIAN = 0.4549364231195724  # scipy.stats.chi2(1).median()
TABLE_COLUMNS = ("run", "N", "D", "loss", "frac", "final")
# The split into fitted and held-out sizes reads this column when the table has it, else N: the testbed's models are
# named and held out by their non-embedding size even when the fit counts every parameter.
SIZE_COLUMN = "N_split"
# (Mis)Fitting testbed (Li, Kudugunta & Zettlemoyer 2025, hadasah/scaling_laws data/scaling_results.csv) columns read.
TESTBED_COLUMNS = ("loss", "N", "N_no_emb", "D", "portion_steps_elapsed", "model", "total_steps", "total_epochs",
                   "peak_lr", "sweep")


# --------------------------------------------------------------------------------------------------------------------
# The point table: one row per checkpoint (run, N, D, loss, frac = share of the run done, final)
# --------------------------------------------------------------------------------------------------------------------
def load_testbed(path: str | Path, *, n_column: str = "N_no_emb") -> pd.DataFrame:
    """The (Mis)Fitting testbed's training curves as a point table, best peak learning rate per (model, steps).

    A run is (sweep, model, peak_lr, total_steps, total_epochs); of the runs of one model and length only the one with
    the lowest final loss is kept (the testbed sweeps peak_lr; its README takes the min over peak_lr), with all its
    checkpoints. Some 17m runs of one sweep log a step twice with different losses: the first row of each step is kept.
    `n_column`: "N_no_emb" (non-embedding, Kaplan et al. 2020; the model names 12m..1b) or "N" (with embeddings).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; give the testbed CSV (misfitting2025_scaling_results.csv)")
    df = pd.read_csv(path)
    missing = [c for c in TESTBED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: lacks columns {missing}; give the (Mis)Fitting testbed's scaling_results.csv "
                         f"(one row per checkpoint with {list(TESTBED_COLUMNS)})")
    if n_column not in ("N", "N_no_emb"):
        raise ValueError(f"n_column={n_column!r}: use 'N_no_emb' (non-embedding parameters) or 'N' (all)")
    # A few rows run past the planned steps (portion > 1, a 70m run): not a checkpoint of the planned run.
    df = df[df["portion_steps_elapsed"] <= 1.0 + 1e-9]
    df = df.assign(run=df["sweep"] + "/" + df["model"] + "/lr" + df["peak_lr"].astype(str) + "/steps"
                   + df["total_steps"].astype(str) + "/ep" + df["total_epochs"].astype(str))
    df = df.drop_duplicates(["run", "D"])
    final = df[np.isclose(df["portion_steps_elapsed"], 1.0)].sort_values("loss")
    best = final.drop_duplicates(["model", "total_steps"])["run"]
    df = df[df["run"].isin(set(best))]
    out = pd.DataFrame({"run": df["run"], "model": df["model"], "N": df[n_column].astype(float),
                        SIZE_COLUMN: df["N_no_emb"].astype(float),
                        "D": df["D"].astype(float), "loss": df["loss"].astype(float),
                        "frac": df["portion_steps_elapsed"].astype(float),
                        "final": np.isclose(df["portion_steps_elapsed"], 1.0), "peak_lr": df["peak_lr"]})
    return out.sort_values(["N", "run", "D"]).reset_index(drop=True)


def check_table(points: pd.DataFrame, what: str = "extrapolation") -> pd.DataFrame:
    missing = [c for c in TABLE_COLUMNS if c not in points.columns]
    if missing:
        raise ValueError(f"{what}: the point table lacks columns {missing}; it needs {list(TABLE_COLUMNS)} (one row "
                         "per checkpoint; load_testbed builds it from the (Mis)Fitting CSV)")
    for c in ("N", "D", "loss"):
        check_positive_finite(points[c], f"{what}: column {c}")
    if not points["final"].any():
        raise ValueError(f"{what}: no row has final=True; mark each run's last checkpoint as final")
    return points


def curve_noise(points: pd.DataFrame, *, min_frac: float = 0.1) -> pd.Series:
    """SD of log loss per model size, from the checkpoint-to-checkpoint scatter of its runs' curves: Gasser, Sroka &
    Jennen-Steinmetz 1986 (Biometrika 73(3), eq. 2) pseudo-residuals e_i = a_i y_{i-1} + b_i y_{i+1} - y_i of three
    consecutive checkpoints (y = log loss, x = log D; a_i, b_i the linear-interpolation weights), whose c_i^2 e_i^2,
    c_i^2 = 1 / (a_i^2 + b_i^2 + 1), have mean sigma^2 where the curve is locally linear. Pooled per size by the
    median over 0.455 (the median of chi^2_1), which a few mislogged checkpoints cannot move. Checkpoints before
    `min_frac` of a run are skipped: the curve bends too fast there for a local line."""
    rows = []
    for (N, _), g in points[points["frac"] >= min_frac].groupby(["N", "run"]):
        g = g.drop_duplicates("D").sort_values("D")
        if len(g) < 3:
            continue
        x, y = np.log(g["D"].to_numpy()), np.log(g["loss"].to_numpy())
        h = x[2:] - x[:-2]
        a, b = (x[2:] - x[1:-1]) / h, (x[1:-1] - x[:-2]) / h
        e = a * y[:-2] + b * y[2:] - y[1:-1]
        rows += [(N, v) for v in e ** 2 / (a ** 2 + b ** 2 + 1)]
    if not rows:
        raise ValueError("inverse-variance weights: no run has 3 checkpoints past "
                         f"{min_frac:.0%} of training to estimate its noise; give a loss_sd column (seed replicates)")
    var = pd.DataFrame(rows, columns=["N", "v"]).groupby("N")["v"].median() / CHI2_1_MEDIAN
    return np.sqrt(var.reindex(sorted(points["N"].unique())).fillna(var.median()))


# --------------------------------------------------------------------------------------------------------------------
# Fitting choices
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FitChoice:
    method: str = "huber"
    weights: str = "none"
    checkpoints: float | None = None
    frontier: float | None = None
    drop_smallest: int = 0
    tie_exponents: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"fit choice method={self.method!r}: use one of {METHODS}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"fit choice weights={self.weights!r}: use one of {WEIGHTS}")
        if self.checkpoints is not None and not 0 <= self.checkpoints < 1:
            raise ValueError(f"fit choice checkpoints={self.checkpoints!r}: give the fraction of training after "
                             "which intermediate checkpoints join (0 <= f < 1, e.g. 0.2), or None for final only")
        if self.frontier is not None and not self.frontier >= 0:
            raise ValueError(f"fit choice frontier={self.frontier!r}: give a tolerance >= 0 (e.g. 0.01) or None")
        if self.drop_smallest < 0:
            raise ValueError(f"fit choice drop_smallest={self.drop_smallest}: give a number of sizes >= 0")

    @property
    def name(self) -> str:
        parts = [self.method]
        if self.weights != "none":
            parts.append(f"w={self.weights}")
        if self.checkpoints is not None:
            parts.append(f"ckpt>={self.checkpoints:g}")
        if self.frontier is not None:
            parts.append(f"frontier{self.frontier:g}")
        if self.drop_smallest:
            parts.append(f"drop{self.drop_smallest}")
        if self.tie_exponents:
            parts.append("alpha=beta")
        return " ".join(parts)


def select_points(points: pd.DataFrame, choice: FitChoice) -> pd.DataFrame:
    """The points `choice` fits: checkpoints, then the smallest sizes dropped, then the frontier."""
    keep = points["final"] if choice.checkpoints is None else points["final"] | (points["frac"] >= choice.checkpoints)
    out = points[keep]
    sizes = np.sort(out["N"].unique())
    if choice.drop_smallest:
        if choice.drop_smallest >= len(sizes) - 1:
            raise ValueError(f"drop_smallest={choice.drop_smallest} leaves {len(sizes) - choice.drop_smallest} of "
                             f"{len(sizes)} sizes; keep at least 2 (drop fewer or fit more sizes)")
        out = out[out["N"] >= sizes[choice.drop_smallest]]
    if choice.frontier is not None:
        C = 6 * out["N"] * out["D"]  # Kaplan et al. 2020 sec. 2.1 (C ~ 6ND); only the order along C matters here
        best = out["loss"].groupby(C).min().cummin()  # the best loss at no more compute than each C (ties included)
        out = out[out["loss"].to_numpy() <= (1 + choice.frontier) * best.reindex(C).to_numpy()]
    return out


def point_weights(points: pd.DataFrame, choice: FitChoice, sigma_log: pd.Series | None = None) -> np.ndarray | None:
    """Per-point weights in the fitter's units: huber fits log loss (w = 1/sigma_log^2), vpnls loss (1/sigma_L^2)."""
    if choice.weights == "none":
        return None
    if choice.weights == "compute":
        C = 6 * points["N"].to_numpy() * points["D"].to_numpy()
        return C / C.mean()
    if "loss_sd" in points.columns:
        sd_log = (points["loss_sd"] / points["loss"]).to_numpy(float)
    else:
        if sigma_log is None:
            raise ValueError("inverse-variance weights: give sigma_log (curve_noise of the table) or a loss_sd column")
        sd_log = points["N"].map(sigma_log).to_numpy(float)
    sd = sd_log if choice.method == "huber" else sd_log * points["loss"].to_numpy()
    return 1.0 / sd ** 2


# --------------------------------------------------------------------------------------------------------------------
# Tied exponents (Gadre et al. 2024): the Chinchilla fitters with beta = alpha
# --------------------------------------------------------------------------------------------------------------------
def fit_tied_huber(N, D, loss, *, weights=None, delta: float = 1e-3, n_starts: int = 8) -> Approach3Fit:
    """Hoffmann et al. 2022 app. D.2's fit with alpha = beta: p = (a, b, e, alpha); the gradient in the shared
    exponent is the sum of the untied gradients in alpha and beta."""
    N, D, loss = (check_positive_finite(v, k) for v, k in ((N, "N"), (D, "D"), (loss, "loss")))
    check_min_points(len(N), 5, "approach 3 with alpha = beta (4 parameters)")
    w = relative_weights(weights, len(N), "approach 3 with alpha = beta")
    c_P = None if w is None else np.sqrt(w)
    logN, logD, logL = np.log(N), np.log(D), np.log(loss)

    def f(p4):
        val, g = _huber_lse_objective(np.r_[p4, p4[3]], logN, logD, logL, delta, c_P)
        return val, np.r_[g[:3], g[3] + g[4]]

    grid_Sx5 = GRID_Sx5[GRID_Sx5[:, 3] == GRID_Sx5[:, 4]]
    grid_Sx5 = grid_Sx5[np.argsort(_huber_lse_batch(grid_Sx5, logN, logD, logL, delta, c_P))[:n_starts]]
    best = None
    for p0 in grid_Sx5[:, :4]:
        r = optimize.minimize(f, p0, jac=True, method="L-BFGS-B",
                              options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-10})
        if np.all(np.isfinite(r.x)) and (best is None or r.fun < best.fun):
            best = r
    a, b, e, alpha = best.x
    return Approach3Fit(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                        beta=float(alpha), n_points=len(N), objective=float(best.fun), method="huber-lbfgs-tied")


def fit_tied_vpnls(N, D, loss, *, weights=None) -> Approach3Fit:
    """The VPNLS fit with alpha = beta: (E, A, B) by NNLS for each alpha, bounded Brent over alpha after a scan."""
    N, D, loss = (check_positive_finite(v, k) for v, k in ((N, "N"), (D, "D"), (loss, "loss")))
    check_min_points(len(N), 5, "approach 3 (VPNLS) with alpha = beta (4 parameters)")
    w = relative_weights(weights, len(N), "approach 3 (VPNLS) with alpha = beta")
    sqrt_w = None if w is None else np.sqrt(w)
    sN, sD = np.exp(np.mean(np.log(N))), np.exp(np.mean(np.log(D)))  # as fit_approach3_vpnls: keeps N^-alpha finite
    n, d = N / sN, D / sD
    sse = lambda al: _vp_inner(al, al, n, d, loss, sqrt_w)[1]  # noqa: E731
    grid = np.linspace(0.02, 2.0, 100)
    i = int(np.argmin([sse(al) for al in grid]))
    r = optimize.minimize_scalar(sse, bounds=(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]),
                                 method="bounded", options={"xatol": 1e-9})
    (E, An, Bd), res = _vp_inner(r.x, r.x, n, d, loss, sqrt_w)
    return Approach3Fit(E=float(E), A=float(An * sN ** r.x), B=float(Bd * sD ** r.x), alpha=float(r.x),
                        beta=float(r.x), n_points=len(N), objective=float(res), method="vpnls-tied")


def fit_choice(points: pd.DataFrame, choice: FitChoice, sigma_log: pd.Series | None = None) -> Approach3Fit:
    """Fit Chinchilla's L(N, D) to `points` (already the training sizes) the way `choice` says."""
    pts = select_points(points, choice)
    w = point_weights(pts, choice, sigma_log)
    N, D, L = pts["N"], pts["D"], pts["loss"]
    # scipy's L-BFGS-B calls BLAS on 5-vectors: a threaded BLAS on a busy machine then runs ~15x slower than one thread.
    with threadpool_limits(limits=1, user_api="blas"):
        if choice.tie_exponents:
            tied = fit_tied_huber if choice.method == "huber" else fit_tied_vpnls
            return tied(N, D, L, weights=w)
        if choice.method == "huber":
            return fit_approach3(N, D, L, weights=w, n_starts=N_STARTS)
        return fit_approach3_vpnls(N, D, L, weights=w)


# --------------------------------------------------------------------------------------------------------------------
# The backtest
# --------------------------------------------------------------------------------------------------------------------
def split_by_size(points: pd.DataFrame, ratio: float, *, min_ratio: float = 10.0,
                  max_size: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held-out): every point of the sizes N <= N_max / ratio, and the final checkpoints of the sizes at
    least `min_ratio` times the largest training size (sizes from column N_split when present, else N).
    `max_size`: leave out the sizes above it first (N_max is then the largest size left: another target)."""
    if not ratio > 1:
        raise ValueError(f"ratio={ratio!r}: give how many times smaller than the largest the fitted sizes are (> 1)")
    size = points[SIZE_COLUMN] if SIZE_COLUMN in points.columns else points["N"]
    if max_size is not None:
        if not (size <= max_size).any():
            raise ValueError(f"max_size={max_size:.3g} is below every model size (the smallest is {size.min():.3g}); "
                             "give the largest size to keep, e.g. 4e8")
        points, size = points[size <= max_size], size[size <= max_size]
    sizes = np.sort(size.unique())
    train = points[size <= sizes[-1] / ratio]
    if train["N"].nunique() < 2:
        raise ValueError(f"ratio {ratio:g}: {train['N'].nunique()} size(s) at or below N_max / {ratio:g} = "
                         f"{sizes[-1] / ratio:.3g}; need at least 2 to fit (use a smaller ratio)")
    N_fit = size[train.index].max()
    test = points[(size >= min_ratio * N_fit) & points["final"]]
    if test.empty:
        raise ValueError(f"ratio {ratio:g}: no size is {min_ratio:g}x the largest fitted ({N_fit:.3g}); the largest "
                         f"is {sizes[-1] / N_fit:.3g}x (lower min_ratio or raise ratio)")
    return train, test


def extrapolation_backtest(points: pd.DataFrame, choice: FitChoice, ratio: float, *, min_ratio: float = 10.0,
                           max_size: float | None = None, sigma_log: pd.Series | None = None) -> dict:
    """Fit `choice` on the sizes N <= N_max / ratio; the relative error of each held-out final checkpoint."""
    check_table(points)
    train, test = split_by_size(points, ratio, min_ratio=min_ratio, max_size=max_size)
    if choice.weights == "inverse_variance" and sigma_log is None and "loss_sd" not in points.columns:
        sigma_log = curve_noise(points)
    fit = fit_choice(train, choice, sigma_log)
    pred = fit(test["N"], test["D"])
    size = SIZE_COLUMN if SIZE_COLUMN in points.columns else "N"
    N_fit = float(train[size].max())
    rows = [{"run": r, "N": float(N), "D": float(D), "N_over_fitted": float(S / N_fit), "loss": float(L),
             "predicted": float(p), "rel_error": float((p - L) / L)}
            for r, N, S, D, L, p in zip(test["run"], test["N"], test[size], test["D"], test["loss"], pred)]
    return {"choice": choice.name, "ratio": ratio, "N_fit_max": N_fit, "n_fit_points": fit.n_points,
            "fit": {k: getattr(fit, k) for k in ("E", "A", "B", "alpha", "beta")}, "heldout": rows,
            "mean_abs_rel_error": float(np.mean([abs(r["rel_error"]) for r in rows]))}


# Each choice the issue names, changed one at a time from Hoffmann et al. 2022's Approach 3 (BASELINE), under each
# fitter (the law's two estimators); `compare_choices` then combines the single changes that helped.
BASELINE = FitChoice()
CHANGES = (
    BASELINE, FitChoice(weights="inverse_variance"), FitChoice(weights="compute"),
    FitChoice(checkpoints=0.0), FitChoice(checkpoints=0.1), FitChoice(checkpoints=0.2), FitChoice(checkpoints=0.3),
    FitChoice(frontier=0.0), FitChoice(frontier=0.02),
    FitChoice(drop_smallest=1), FitChoice(drop_smallest=2),
    FitChoice(tie_exponents=True),
)
ONE_AT_A_TIME = CHANGES + tuple(dataclasses.replace(c, method="vpnls") for c in CHANGES)


def _changed(c: FitChoice, reference: FitChoice) -> dict:
    return {f.name: getattr(c, f.name) for f in dataclasses.fields(c)
            if getattr(c, f.name) != getattr(reference, f.name)}


def combine(changes: list[FitChoice], reference: FitChoice = BASELINE) -> FitChoice:
    """`reference` with every field in which any of `changes` differs from it (later ones win)."""
    fields = {}
    for c in changes:
        fields.update(_changed(c, reference))
    return dataclasses.replace(reference, **fields)


def compare_choices(points: pd.DataFrame, choices=ONE_AT_A_TIME, ratios=(10.0, 14.0, 20.0), *, min_ratio: float = 10.0,
                    max_size: float | None = None, combinations: bool = True) -> dict:
    """Backtest every choice at every ratio; with `combinations`, also every pair and the triple of the three best
    single changes from the first choice, the reference (by mean error over the ratios). A choice that cannot be
    fitted at some ratio (e.g. it drops too many sizes) is a row with its "error".
    Returns {"rows": [...], "best": name, "results": [...]}."""
    check_table(points)
    sigma_log = None if "loss_sd" in points.columns else curve_noise(points)
    results: dict[str, list[dict] | str] = {}

    def run(choice: FitChoice):
        if choice.name not in results:
            try:
                results[choice.name] = [extrapolation_backtest(points, choice, r, min_ratio=min_ratio,
                                                               max_size=max_size, sigma_log=sigma_log)
                                        for r in ratios]
            except ValueError as exc:
                results[choice.name] = str(exc)

    def error(c: FitChoice) -> float:
        res = results[c.name]
        return math.inf if isinstance(res, str) else _mean_error(res)

    for c in choices:
        run(c)
    if combinations:
        ref = choices[0]
        helped = sorted((c for c in choices if c != ref and error(c) < error(ref)), key=error)
        top = _distinct_fields(helped, ref)[:3]
        for i in range(len(top)):
            for j in range(i + 1, len(top)):
                run(combine([top[i], top[j]], ref))
        if len(top) == 3:
            run(combine(top, ref))
    rows = [{"choice": name, "error": res} if isinstance(res, str) else _row(name, res)
            for name, res in results.items()]
    fitted = [r for r in rows if "error" not in r]
    if not fitted:
        raise ValueError(f"extrapolation: no choice could be fitted ({rows[0]['error']})")
    best = min(fitted, key=lambda r: r["mean_abs_rel_error"])["choice"]
    return {"ratios": list(ratios), "min_ratio": min_ratio, "max_size": max_size, "rows": rows, "best": best,
            "results": [r for res in results.values() if not isinstance(res, str) for r in res]}


def _distinct_fields(choices: list[FitChoice], reference: FitChoice) -> list[FitChoice]:
    """The best change per field (checkpoints 0.1 and 0.2 cannot combine: keep the better, listed first)."""
    seen, out = set(), []
    for c in choices:
        changed = frozenset(_changed(c, reference))
        if not changed & seen:
            out.append(c)
            seen |= changed
    return out


def _mean_error(res: list[dict]) -> float:
    return float(np.mean([r["mean_abs_rel_error"] for r in res]))


def _row(name: str, res: list[dict]) -> dict:
    errs = [abs(h["rel_error"]) for r in res for h in r["heldout"]]
    first = res[0]
    return {"choice": name, **{f"error_r{r['ratio']:g}": r["mean_abs_rel_error"] for r in res},
            "mean_abs_rel_error": _mean_error(res), "max_abs_rel_error": float(max(errs)),
            "n_fit_points": first["n_fit_points"], "alpha": first["fit"]["alpha"], "beta": first["fit"]["beta"],
            "E": first["fit"]["E"]}


def comparison_markdown(cmp: dict, source: str = "") -> str:
    """The comparison table; `source` titles it (default: the CSV, N column and max size `write_comparison` noted)."""
    if not source and "source" in cmp:
        source = f"{Path(cmp['source']).name}, N = {cmp['n_column']}"
        source += f", sizes <= {cmp['max_size']:.3g}" if cmp.get("max_size") else ""
    ratios = cmp["ratios"]
    head = ["choice"] + [f"error at r={r:g}" for r in ratios] + ["mean", "max", "points (r=%g)" % ratios[0],
                                                                 "alpha", "beta", "E"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(cmp["rows"], key=lambda r: r.get("mean_abs_rel_error", math.inf)):
        if "error" in row:
            lines.append(f"| {row['choice']} | not fitted: {row['error']} |" + " |" * (len(head) - 2))
            continue
        bold = "**" if row["choice"] == cmp["best"] else ""
        cells = ([f"{bold}{row['choice']}{bold}"] + [f"{row[f'error_r{r:g}']:.2%}" for r in ratios]
                 + [f"{bold}{row['mean_abs_rel_error']:.2%}{bold}", f"{row['max_abs_rel_error']:.2%}",
                    str(row["n_fit_points"]), f"{row['alpha']:.3f}", f"{row['beta']:.3f}", f"{row['E']:.3f}"])
        lines.append("| " + " | ".join(cells) + " |")
    held = {(h["run"], round(h["N_over_fitted"], 1)) for r in cmp["results"] for h in r["heldout"]}
    return "\n".join([
        f"# Extrapolation backtest{': ' + source if source else ''}",
        "",
        f"Fit L(N, D) = E + A/N^alpha + B/D^beta on the sizes N <= N_max / r, predict the final loss of every size at "
        f"least {cmp['min_ratio']:g}x the largest fitted ({len(held)} held-out run-ratio pairs); error = "
        "|L_pred - L_true| / L_true, mean over held-out runs. Sorted by the mean over r; best in bold.",
        "",
        *lines,
        "",
    ])


def write_comparison(csv: str | Path, out: str | Path, *, n_column: str = "N_no_emb", ratios=(10.0, 14.0, 20.0),
                     min_ratio: float = 10.0, max_size: float | None = None, methods=METHODS,
                     combinations: bool = True) -> dict:
    """`python -m analysis extrapolation CSV --out DIR`: the comparison over the testbed CSV as DIR/extrapolation.json
    and DIR/extrapolation.md; `methods` keeps the one-at-a-time choices of those fitters."""
    from scaling.record import write_json_atomic, write_text_atomic

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods {sorted(unknown)}: use some of {METHODS}")
    choices = [c for c in ONE_AT_A_TIME if c.method in methods]
    points = load_testbed(csv, n_column=n_column)
    cmp = compare_choices(points, choices, ratios, min_ratio=min_ratio, max_size=max_size, combinations=combinations)
    cmp.update(source=str(csv), n_column=n_column)
    out = Path(out)
    write_json_atomic(out / "extrapolation.json", cmp, indent=1)
    write_text_atomic(out / "extrapolation.md", comparison_markdown(cmp))
    return cmp

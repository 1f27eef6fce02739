"""Scaling-law fits: Kaplan et al. 2020 power laws and Chinchilla (Hoffmann et al. 2022) Approaches 1-3.

Pure numpy/scipy. Every function takes plain arrays (or a tidy frame for the grouped fits) and returns a frozen
dataclass whose `as_dict()` uses the papers' symbols as keys, which is what the CLI writes to JSON.

Symbols: N parameters, D tokens, C = k N D training FLOPs (k = 6 under the usual convention), L loss in nats/token.
C is in the table's one convention (analysis.load): every approach fits and is queried in it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import interpolate, optimize

from analysis.validate import check_positive_finite, check_min_points
from scaling.accounting import FLOPS_PER_PARAM_TOKEN

# The k of C = k N D when a fit is given no other: 6 (Kaplan et al. 2020 eq. 2.1 / Hoffmann et al. 2022 sec. 3).
FLOPS_PER_TOKEN = FLOPS_PER_PARAM_TOKEN
# A power law's x must span more than this factor: closer points are one x within rounding (fit_power_law).
MIN_X_SPAN = 1.01


# --------------------------------------------------------------------------------------------------------------------
# Weighted power law in log space: y = k x^a  (Hoffmann et al. 2022 sec. 3.1/3.2; Porian et al. 2024 sec. 2)
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = k * x**a, fitted by (weighted) least squares of log y on log x."""

    a: float
    k: float
    n_points: int

    def __call__(self, x):
        return self.k * np.asarray(x, dtype=float) ** self.a

    def as_dict(self) -> dict:
        return {"a": self.a, "k": self.k, "n_points": self.n_points}


def fit_power_law(x, y, weights=None, *, name: str = "y") -> PowerLaw:
    """Least squares of log y = log k + a log x; `weights` multiply squared residuals (Porian et al. use 1/sd^2)."""
    x = check_positive_finite(x, "x")
    y = check_positive_finite(y, name)
    check_min_points(len(x), 2, f"power law {name} ~ x^a")
    if len(np.unique(x)) < 2:
        raise ValueError(f"power law {name} ~ x^a: all x are equal ({x[0]:g}); need at least 2 distinct x values")
    # Runs of one compute budget differ in C by rounding only (a few 1e-5): over such a range the slope is their loss
    # differences over ~0, e.g. alpha_C = 2870 from a sweep's two runs at 1e11.
    if x.max() / x.min() < MIN_X_SPAN:
        raise ValueError(f"power law {name} ~ x^a: the x values span a factor of only {x.max() / x.min():.6f} "
                         f"({x.min():g} .. {x.max():g}), one value within rounding (e.g. runs of one compute budget); "
                         f"need x values at least {MIN_X_SPAN - 1:.0%} apart")
    w = np.ones_like(x) if weights is None else check_positive_finite(weights, "weights")
    if len(w) != len(x):
        raise ValueError(f"weights: length {len(w)} != {len(x)} points; give one weight per point")
    # np.polyfit weights multiply the residual (not its square), hence sqrt.
    a, log_k = np.polyfit(np.log(x), np.log(y), 1, w=np.sqrt(w))
    return PowerLaw(a=float(a), k=float(np.exp(log_k)), n_points=len(x))


def relative_weights(weights, n: int, what: str) -> np.ndarray | None:
    """Per-point weights w_i = 1/sigma_i^2 (inverse-variance weighting of least squares: Aitken 1935; e.g. Seber &
    Lee 2003, Linear Regression Analysis, sec. 3.10) scaled to mean 1, or None when there are none or all are equal:
    a uniform weight is the unweighted fit, and None keeps that fit bit-identical. Mean 1 leaves the objective's
    scale as unweighted, so a Huber delta keeps its units (analysis.laws.approach3)."""
    if weights is None:
        return None
    w = check_positive_finite(weights, f"{what} weights")
    if len(w) != n:
        raise ValueError(f"{what} weights: {len(w)} given for {n} points; give one weight (1/sigma^2) per point")
    if np.all(w == w[0]):
        return None
    return w / w.mean()


# --------------------------------------------------------------------------------------------------------------------
# Kaplan et al. 2020: L(X) = (X_c / X)^alpha_X [+ E]   (eqs. 1.1, 1.2, 1.3)
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KaplanFit:
    """L(X) = E + (X_c / X)^alpha, E = 0 unless the irreducible term was fitted."""

    variable: str  # "N", "D" or "C"
    alpha: float
    X_c: float
    E: float
    n_points: int

    def __call__(self, X):
        return self.E + (self.X_c / np.asarray(X, dtype=float)) ** self.alpha

    def as_dict(self) -> dict:
        v = self.variable
        return {f"alpha_{v}": self.alpha, f"{v}_c": self.X_c, "E": self.E, "n_points": self.n_points}


def fit_kaplan(X, L, *, variable: str = "N", irreducible: bool = False, weights=None) -> KaplanFit:
    """Fit Kaplan et al. 2020 eq. 1.1-1.3: L = (X_c/X)^alpha, optionally + E (their eq. 1.4 style offset).

    Without E this is linear in log space. With E we minimise squared error of log L, which keeps the large-loss
    small models from dominating, starting from the E = 0 solution. `weights` (1/sigma^2 of log L per point, e.g.
    from seed replicates: analysis.checks.seeds) multiply the squared log residuals.
    """
    X = check_positive_finite(X, variable)
    L = check_positive_finite(L, "loss")
    n_params = 3 if irreducible else 2
    check_min_points(len(X), n_params + (1 if irreducible else 0), f"Kaplan L({variable})")
    w = relative_weights(weights, len(X), f"Kaplan L({variable})")
    pl = fit_power_law(X, L, w, name="loss")  # log L = log k + a log X, a = -alpha, k = X_c^alpha
    alpha0 = max(-pl.a, 1e-3)
    logXc0 = np.log(pl.k) / alpha0
    if not irreducible:
        return KaplanFit(variable, alpha=-pl.a, X_c=float(np.exp(logXc0)), E=0.0, n_points=len(X))
    logX, logL = np.log(X), np.log(L)
    sqrt_w = 1.0 if w is None else np.sqrt(w)

    def resid(p):
        alpha, logXc, logE = p
        with np.errstate(divide="ignore", over="ignore"):  # a trial step may underflow both terms: a huge residual
            return (np.log(np.exp(logE) + np.exp(alpha * (logXc - logX))) - logL) * sqrt_w

    best = None
    for frac in (0.1, 0.5, 0.9):  # E starts at a fraction of the smallest loss
        p0 = [alpha0, logXc0, np.log(frac * L.min())]
        r = optimize.least_squares(resid, p0, method="lm", max_nfev=5000)
        if best is None or r.cost < best.cost:
            best = r
    alpha, logXc, logE = best.x
    return KaplanFit(variable, alpha=float(alpha), X_c=float(np.exp(logXc)), E=float(np.exp(logE)), n_points=len(X))


def lower_envelope(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Points on the running minimum of y over increasing x (the compute-efficient frontier, Kaplan fig. 1)."""
    order = np.argsort(x, kind="stable")
    x, y = np.asarray(x, float)[order], np.asarray(y, float)[order]
    keep = y <= np.minimum.accumulate(y)
    return x[keep], y[keep]


# --------------------------------------------------------------------------------------------------------------------
# Chinchilla Approach 1 (Hoffmann et al. 2022 sec. 3.1): lower envelope of training curves over FLOPs
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Approach1Fit:
    N_opt: PowerLaw  # N_opt = k C^a
    D_opt: PowerLaw  # D_opt = k' C^b
    frontier: pd.DataFrame  # columns C, loss, N, D, run: the envelope on the C grid

    def as_dict(self) -> dict:
        return {"a": self.N_opt.a, "b": self.D_opt.a, "k_N": self.N_opt.k, "k_D": self.D_opt.k,
                "n_points": len(self.frontier)}


def fit_approach1(curves: pd.DataFrame, *, n_grid: int = 250, min_runs_per_point: int = 1) -> Approach1Fit:
    """Hoffmann et al. 2022 sec. 3.1: for each C on a log grid, the run with the lowest (interpolated) loss at C
    gives (N_opt, D_opt); then N_opt = k C^a and D_opt = k' C^b by least squares in log space.

    `curves` has one row per logged step: run, N, C (cumulative FLOPs), D (tokens so far), loss. Each run's loss is
    interpolated linearly in log C; a run only competes inside the C range it covers (no extrapolation).
    """
    need = ["run", "N", "C", "D", "loss"]
    missing = [c for c in need if c not in curves.columns]
    if missing:
        raise ValueError(f"approach 1: curves table lacks columns {missing}; it needs {need} (one row per step)")
    cur = curves.dropna(subset=["C", "D", "loss"])
    cur = cur[(cur["C"] > 0) & (cur["D"] > 0) & (cur["loss"] > 0)]
    runs = [g.sort_values("C") for _, g in cur.groupby("run") if len(g) >= 2]
    check_min_points(len(runs), 2, "approach 1 (runs with >= 2 logged points)")
    lo = min(np.log(g["C"].iloc[0]) for g in runs)
    hi = max(np.log(g["C"].iloc[-1]) for g in runs)
    logC_G = np.linspace(lo, hi, n_grid)
    loss_RxG = np.full((len(runs), n_grid), np.inf)
    logD_RxG = np.zeros((len(runs), n_grid))
    for r, g in enumerate(runs):
        lc = np.log(g["C"].to_numpy())
        inside = (logC_G >= lc[0]) & (logC_G <= lc[-1])
        loss_RxG[r, inside] = np.interp(logC_G[inside], lc, g["loss"].to_numpy())
        logD_RxG[r, inside] = np.interp(logC_G[inside], lc, np.log(g["D"].to_numpy()))
    covered = np.isfinite(loss_RxG).sum(0) >= max(min_runs_per_point, 1)
    best = np.argmin(loss_RxG, axis=0)
    cols = np.arange(n_grid)
    frontier = pd.DataFrame({
        "C": np.exp(logC_G), "loss": loss_RxG[best, cols], "N": [runs[r]["N"].iloc[0] for r in best],
        "D": np.exp(logD_RxG[best, cols]), "run": [runs[r]["run"].iloc[0] for r in best],
    })[covered].reset_index(drop=True)
    if frontier["N"].nunique() < 2:
        raise ValueError("approach 1: one model size wins the whole envelope, so N_opt(C) is not identifiable; "
                         "train more sizes or longer so the frontier changes model")
    return Approach1Fit(N_opt=fit_power_law(frontier["C"], frontier["N"], name="N_opt"),
                        D_opt=fit_power_law(frontier["C"], frontier["D"], name="D_opt"), frontier=frontier)


# --------------------------------------------------------------------------------------------------------------------
# Chinchilla Approach 2 (Hoffmann et al. 2022 sec. 3.2): IsoFLOP parabolas
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Parabola:
    """loss = c0 + c1 x + c2 x^2 with x = log(N) (or log D); minimum at x* = -c1 / (2 c2)."""

    c0: float
    c1: float
    c2: float

    @property
    def x_min(self) -> float:
        return -self.c1 / (2 * self.c2)

    @property
    def loss_min(self) -> float:
        return self.c0 - self.c1 ** 2 / (4 * self.c2)

    def __call__(self, x):
        x = np.asarray(x, float)
        return self.c0 + self.c1 * x + self.c2 * x ** 2


def fit_parabola(x, loss, *, window: int | None = None, budget: float | None = None, weights=None) -> Parabola:
    """Least-squares parabola of loss in x = log N. `window` keeps only the `window` points nearest the empirical
    minimum on each side (Porian et al. 2024 fit near the minimum: far points of an IsoFLOP curve are not parabolic).
    `weights` (1/sigma^2 of each point's loss, e.g. its seed noise: analysis.checks.seeds) multiply the squared
    residuals."""
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    where = f" at budget C={budget:.4g}" if budget is not None else ""
    w = relative_weights(weights, len(x), f"IsoFLOP parabola{where}")
    order = np.argsort(x)
    x, loss = x[order], loss[order]
    w = None if w is None else w[order]
    if window is not None:
        i = int(np.argmin(loss))
        sl = slice(max(i - window, 0), i + window + 1)
        x, loss = x[sl], loss[sl]
        w = None if w is None else w[sl]
    check_min_points(len(np.unique(x)), 3, f"IsoFLOP parabola{where} (distinct sizes)")
    # np.polyfit's w multiplies the residual (not its square), hence sqrt.
    c2, c1, c0 = np.polyfit(x, loss, 2) if w is None else np.polyfit(x, loss, 2, w=np.sqrt(w))
    if c2 <= 0:
        raise ValueError(f"IsoFLOP parabola{where} opens downwards (curvature {c2:.3g}): the sizes do not bracket "
                         "the minimum; add smaller and larger models at this budget or drop the budget")
    return Parabola(float(c0), float(c1), float(c2))


def _akima_min(x, loss, multiplier: int = 25) -> tuple[float, float] | None:
    """Porian et al. 2024 (their analysis.interpolation): Akima interpolation of log loss on x = log N over a fine
    grid, (n-1)*25 points; the argmin, or None when it sits on the grid's edge (minimum not bracketed)."""
    # Duplicate sizes (bootstrap draws a run twice, or several seeds) are averaged: Akima needs distinct x.
    s = pd.Series(np.log(np.asarray(loss, float))).groupby(np.asarray(x, float)).mean()
    x, logL = s.index.to_numpy(), s.to_numpy()
    grid = np.linspace(x[0], x[-1], (len(x) - 1) * multiplier)
    vals = interpolate.Akima1DInterpolator(x, logL)(grid)
    i = int(np.argmin(vals))
    if i == 0 or i == len(grid) - 1:
        return None
    return float(grid[i]), float(np.exp(vals[i]))


def _budget_minimum(x, loss, method: str, window: int | None, C: float,
                    weights=None) -> tuple[float, float, Parabola | None]:
    """(x_opt, loss_opt, parabola) for one IsoFLOP curve; raises ValueError when the minimum is not bracketed.
    `weights` weight the parabola's points; Akima interpolates the (averaged) points and takes none."""
    if method == "akima":
        check_min_points(len(np.unique(x)), 3, f"IsoFLOP interpolation at budget C={C:.4g} (distinct sizes)")
        found = _akima_min(x, loss)
        if found is None:
            raise ValueError(f"IsoFLOP curve at budget C={C:.4g}: lowest loss is at the smallest or largest size, "
                             "so the minimum is not bracketed; add sizes beyond it or drop the budget")
        return found[0], found[1], None
    p = fit_parabola(x, loss, window=window, budget=C, weights=weights)
    if not (np.min(x) <= p.x_min <= np.max(x)):
        raise ValueError(f"IsoFLOP parabola at budget C={C:.4g}: its minimum lies outside the sizes tried; "
                         "add sizes around the minimum or drop the budget")
    return p.x_min, p.loss_min, p


ISOFLOP_METHODS = ("parabola", "akima")


def isoflop_key(df: pd.DataFrame) -> str:
    """The column that groups runs into IsoFLOP curves: the planned budget when every run has one, else C."""
    return "budget" if "budget" in df.columns and df["budget"].notna().all() else "C"


def slice_C(g: pd.DataFrame, budget: float, N_opt: float | None = None) -> float:
    """The C of one IsoFLOP slice (runs of one planned budget) in the table's C convention.

    When the budgets are in that convention (the default: analysis reads C in the convention the sweep was planned
    in) it is the budget itself. When another convention was asked, each run's budget was converted at its own shape
    (column `budget_C`, through scaling.accounting), and the converted values differ across the slice's sizes. The
    slice's C is then that of its compute-optimal run: budget_C interpolated in log N at N_opt. So N_opt(C) is
    measured in the currency of Approach 1's envelope (the best run at each C) and of Approach 3's budget line; the
    geometric mean of the slice would instead depend on which sizes were tried. Without N_opt: the geometric mean.
    """
    if "budget_C" not in g.columns or not np.isfinite(g["budget_C"].to_numpy(float)).all():
        return budget
    bc = g["budget_C"].to_numpy(float)
    if (bc == budget).all():
        return budget
    if N_opt is None:
        return float(np.exp(np.mean(np.log(bc))))
    s = pd.Series(np.log(bc)).groupby(np.log(g["N"].to_numpy(float))).mean()  # one value per size, sorted by log N
    return float(np.exp(np.interp(np.log(N_opt), s.index.to_numpy(), s.to_numpy())))


def isoflop_minimum(g: pd.DataFrame, C: float, *, method: str = "parabola", window: int | None = None,
                    run_weights: str | None = None) -> dict:
    """One IsoFLOP curve (runs of one budget C): the loss minimum over log N and, separately, over log D. The result's
    "C" is the slice's C in the table's convention (`slice_C`), "budget" the budget it was planned at. `run_weights`
    names a column of per-run parabola weights (1/sigma^2 of the loss)."""
    w = None if run_weights is None else g[run_weights].to_numpy(float)
    xN, lN, pN = _budget_minimum(np.log(g["N"].to_numpy()), g["loss"].to_numpy(), method, window, C, w)
    xD, _, pD = _budget_minimum(np.log(g["D"].to_numpy()), g["loss"].to_numpy(), method, window, C, w)
    N_opt = float(np.exp(xN))
    return {"C": slice_C(g, C, N_opt), "budget": C, "N_opt": N_opt, "D_opt": float(np.exp(xD)), "loss_opt": lN,
            "n_runs": len(g), "parabola_N": pN, "parabola_D": pD}


def isoflop_minima(df: pd.DataFrame, *, method: str = "parabola", window: int | None = None,
                   min_runs: int = 3, run_weights: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per budget (column `budget`, else `C`): minimum of loss over log N and, separately, over log D.

    Returns (minima, skipped): budgets whose minimum is not bracketed are skipped with the reason, never fitted.
    minima["C"] is each slice's C in the table's convention, minima["budget"] (and skipped["C"]) the planned budget.
    """
    if method not in ISOFLOP_METHODS:
        raise ValueError(f"isoflop method={method!r} is unknown; use one of {ISOFLOP_METHODS}")
    key = isoflop_key(df)
    rows, skipped = [], []
    for C, g in df.groupby(key, sort=True):
        if len(g) < min_runs:
            skipped.append({"C": float(C), "n_runs": len(g), "reason": f"fewer than {min_runs} runs"})
            continue
        try:
            rows.append(isoflop_minimum(g, float(C), method=method, window=window, run_weights=run_weights))
        except ValueError as exc:
            skipped.append({"C": float(C), "n_runs": len(g), "reason": str(exc)})
    if len(rows) < 2:
        why = "; ".join(f"C={s['C']:.3g}: {s['reason']}" for s in skipped) or "fewer than 2 budgets"
        raise ValueError(f"approach 2: {len(rows)} usable budget(s), need at least 2 ({why})")
    return pd.DataFrame(rows), pd.DataFrame(skipped, columns=["C", "n_runs", "reason"])


@dataclasses.dataclass(frozen=True)
class Approach2Fit:
    N_opt: PowerLaw  # N_opt = k C^a  (Hoffmann et al. 2022 sec. 3.2)
    D_opt: PowerLaw  # D_opt = k' C^b
    minima: pd.DataFrame  # one row per budget: C, N_opt, D_opt, loss_opt, n_runs (+ parabolas)
    skipped: pd.DataFrame  # budgets left out, with the reason

    def as_dict(self) -> dict:
        return {"a": self.N_opt.a, "b": self.D_opt.a, "k_N": self.N_opt.k, "k_D": self.D_opt.k,
                "n_budgets": len(self.minima)}


def fit_approach2(df: pd.DataFrame, *, weights: Sequence[float] | None = None, method: str = "parabola",
                  window: int | None = None, min_runs: int = 3, run_weights: str | None = None) -> Approach2Fit:
    """Hoffmann et al. 2022 sec. 3.2: per budget, a parabola of loss in log N (and in log D) gives N_opt(C),
    D_opt(C); then N_opt = k C^a and D_opt = k' C^b by (weighted) least squares in log space.

    `method="akima"` locates each minimum by Akima interpolation instead (Porian et al. 2024).
    `weights` (one per budget: a column name of `df`, constant within a budget, or a sequence in increasing C)
    multiply the squared log residuals, e.g. 1/sd^2 as Porian et al. 2024. `run_weights` names a column of per-run
    weights for the parabolas (1/sigma^2 of each run's loss, from seed replicates: analysis.checks.seeds).
    """
    minima, skipped = isoflop_minima(df, method=method, window=window, min_runs=min_runs, run_weights=run_weights)
    w = None
    if isinstance(weights, str):
        key = isoflop_key(df)
        w = df.groupby(key)[weights].first().reindex(minima["budget"].to_numpy()).to_numpy()
    elif weights is not None:
        w = np.asarray(weights, float)
        if len(w) != len(minima):
            raise ValueError(f"weights: {len(w)} given for {len(minima)} usable budgets; give one per budget")
    return Approach2Fit(N_opt=fit_power_law(minima["C"], minima["N_opt"], w, name="N_opt"),
                        D_opt=fit_power_law(minima["C"], minima["D_opt"], w, name="D_opt"), minima=minima,
                        skipped=skipped)

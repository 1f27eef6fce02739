"""Seed replicates: the same run trained at several seeds (`hydra.sweeper.plan.seeds`) measures the noise of each point.

A point is what the fits see of a run: its N, D, planned IsoFLOP budget and peak lr (POINT_KEYS, to 6 significant
digits). Runs of one point at two or more distinct seeds (the record's `seed`, train.seed) are its replicates; per point
the seed-spread table gives n, the mean loss and the seed standard deviation sigma (ddof=1).

Weights. Inverse-variance weighting (Aitken 1935) needs each point's variance, but 2-3 seeds estimate it badly:
s^2 ~ sigma^2 chi^2_d / d with d = n - 1, so with 3 seeds nearly one point in five (P(chi^2_2 < 0.4) = 0.18) comes out
below a fifth of its true variance and gets over 5x its weight. Weighting by sample variances from few replicates is
known to do worse than not weighting (Bement & Williams 1969, JASA 64; Davidian & Carroll 1987, "Variance function
estimation", JASA 82); measured here on synthetic sweeps with 3 seeds, it made the Approach 3 and 2 estimates worse
than unweighted ones. So the variance is modelled, as Davidian & Carroll recommend, by a smooth function of the point
fitted to all replicated points at once: Harvey's (1976,
"Estimating regression models with multiplicative heteroscedasticity", Econometrica 44) log-linear form

    log sigma_log^2(N, D) = g0 + g1 log N + g2 log D,

sigma_log being the sd of log loss (relative noise: seed noise scales with the loss, which varies ~2x over a sweep, and
log loss is Approach 3's residual unit). The slopes are kept only when an F test rejects g1 = g2 = 0 at 5%;
otherwise the noise is homoscedastic, every run weighs the same and the fits are the unweighted ones, exactly.
Either way a point with one run gets the pooled noise: the function's value at its (N, D), or the pooled sigma.

Pure pandas/numpy/scipy, no JAX.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy import special, stats

POINT_KEYS = ("N", "D", "budget", "lr")
# Per-run columns `seed_noise` adds: the point id, the sigma of loss and of log loss used for the run's point, and
# the weights 1/sigma^2 in the units of each fit's residuals (loss: Approach 2 parabolas, VPNLS; log loss: Approach 3
# Huber, Kaplan).
POINT, SIGMA, SIGMA_LOG, W_LOSS, W_LOG = "point", "sigma", "sigma_log", "w_loss", "w_log"
TREND_LEVEL = 0.05  # the variance function's slopes are used when their F test has p below this
MIN_POINTS_FOR_TREND = 5  # replicated points needed to fit the 3-parameter variance function at all


def _key(v) -> str:
    v = pd.to_numeric(v, errors="coerce")
    return f"{float(v):.6g}" if np.isfinite(v) else "nan"


def point_ids(df: pd.DataFrame) -> pd.Series:
    """Each run's point: `N=..|D=..|budget=..|lr=..` (a key absent from the table counts as NaN, equal for all)."""
    cols = [df[k] if k in df.columns else pd.Series(np.nan, index=df.index) for k in POINT_KEYS]
    return pd.Series(["|".join(f"{k}={_key(v)}" for k, v in zip(POINT_KEYS, vals)) for vals in zip(*cols)],
                     index=df.index, dtype=object)


def _seeds(df: pd.DataFrame) -> pd.Series:
    return pd.to_numeric(df["seed"], errors="coerce") if "seed" in df.columns else pd.Series(np.nan, index=df.index)


def replicate_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Usable runs grouped into points: one row per point with POINT_KEYS, C (mean), n (runs), n_seeds (distinct
    seeds), seeds, loss (mean), sigma and sigma_log (sd of loss and of log loss over its runs, ddof=1; NaN for one
    run), rel_sigma = sigma / loss, replicated (2+ distinct seeds) and runs (names), by budget, N, D, lr."""
    t = runs.assign(_point=point_ids(runs), _seed=_seeds(runs), _logL=np.log(runs["loss"].astype(float)))
    rows = []
    for pid, g in t.groupby("_point", sort=False):
        seeds = sorted({int(s) for s in g["_seed"].dropna()})
        n, loss = len(g), float(g["loss"].mean())
        sigma = float(g["loss"].std(ddof=1)) if n > 1 else np.nan
        rows.append({POINT: pid, **{k: (float(g[k].iloc[0]) if k in g.columns else np.nan) for k in POINT_KEYS},
                     "C": float(g["C"].mean()) if "C" in g.columns else np.nan,
                     "n": n, "n_seeds": len(seeds), "seeds": seeds, "loss": loss, SIGMA: sigma,
                     "rel_sigma": sigma / loss,
                     SIGMA_LOG: float(g["_logL"].std(ddof=1)) if n > 1 else np.nan, "replicated": len(seeds) >= 2,
                     "runs": list(g["name"].astype(str))})
    return pd.DataFrame(rows).sort_values(["budget", "N", "D", "lr"], na_position="last").reset_index(drop=True)


def has_replicates(runs: pd.DataFrame) -> bool:
    """Whether some point of the usable runs has runs at 2 or more distinct seeds."""
    if "seed" not in runs.columns or runs.empty:
        return False
    t = runs.assign(_point=point_ids(runs), _seed=_seeds(runs)).dropna(subset=["_seed"])
    return bool((t.groupby("_point")["_seed"].nunique() >= 2).any())


def pooled_sigma_log(points: pd.DataFrame) -> tuple[float, int]:
    """(s_p, dof): the pooled within-point sd of log loss over the replicated points,
    s_p^2 = sum_i (n_i - 1) s_i^2 / sum_i (n_i - 1) on dof = sum_i (n_i - 1) degrees of freedom: the within-groups mean
    square of a one-way ANOVA (e.g. Montgomery, Design and Analysis of Experiments, ch. 3: MS_E)."""
    rep = points[points["replicated"]]
    dof = int((rep["n"] - 1).sum())
    if dof == 0:
        return float("nan"), 0
    return float(np.sqrt(((rep["n"] - 1) * rep[SIGMA_LOG] ** 2).sum() / dof)), dof


@dataclasses.dataclass(frozen=True)
class VarianceTrend:
    """log sigma_log^2 = g0 + g1 log N + g2 log D (Harvey 1976), fitted to the replicated points; p_value: the F test
    of g1 = g2 = 0."""

    gamma: tuple[float, float, float]
    p_value: float | None
    n_points: int
    used: bool  # p_value < TREND_LEVEL: the fits are weighted by it

    def sigma_log(self, N, D) -> np.ndarray:
        g0, g1, g2 = self.gamma
        return np.exp(0.5 * (g0 + g1 * np.log(np.asarray(N, float)) + g2 * np.log(np.asarray(D, float))))


def variance_trend(points: pd.DataFrame) -> VarianceTrend | None:
    """Harvey's (1976) two-step estimator: regress e_i = log s_i^2 - psi(d_i/2) + log(d_i/2) on (1, log N, log D) by
    least squares weighted by 1/psi'(d_i/2). For s^2 ~ sigma^2 chi^2_d / d, E[log s^2] = log sigma^2 + psi(d/2) -
    log(d/2) and Var[log s^2] = psi'(d/2) (psi: digamma; Smyth 2004, Stat. Appl. Genet. Mol. Biol. 3, sec. 6.2), so
    e_i is unbiased and its variance known up to a factor. Points whose runs agree exactly (s = 0) are left out
    (log 0). None when fewer than MIN_POINTS_FOR_TREND replicated points remain."""
    rep = points[points["replicated"] & (points[SIGMA_LOG] > 0)]
    if len(rep) < MIN_POINTS_FOR_TREND:
        return None
    d = (rep["n"] - 1).to_numpy(float)
    e = np.log(rep[SIGMA_LOG].to_numpy(float) ** 2) - special.digamma(d / 2) + np.log(d / 2)
    sw = 1.0 / np.sqrt(special.polygamma(1, d / 2))
    X = np.stack([np.ones(len(rep)), np.log(rep["N"].to_numpy(float)), np.log(rep["D"].to_numpy(float))], axis=1)
    # lstsq: in a one-budget sweep log D = log C - log N - const, so X has rank 2 (the fitted values are still unique)
    gamma, *_ = np.linalg.lstsq(X * sw[:, None], e * sw, rcond=None)
    rank = np.linalg.matrix_rank(X)
    rss = float(np.sum((sw * (e - X @ gamma)) ** 2))
    e0 = np.sum(sw ** 2 * e) / np.sum(sw ** 2)
    rss0 = float(np.sum((sw * (e - e0)) ** 2))
    # The regression F test of the slopes, whose residual variance is estimated rather than taken as psi': noise
    # that varies from point to point without a trend (over-dispersed e_i) then does not pass for a trend.
    k, dof = rank - 1, len(rep) - rank
    p = float(stats.f.sf((rss0 - rss) / k / (rss / dof), k, dof)) if k > 0 and dof > 0 and rss > 0 else 1.0
    return VarianceTrend(gamma=tuple(float(g) for g in gamma), p_value=p, n_points=len(rep), used=p < TREND_LEVEL)


@dataclasses.dataclass(frozen=True)
class SeedNoise:
    points: pd.DataFrame  # replicate_points(runs) plus sigma_used / sigma_log_used: what each point is weighted with
    pooled_sigma_log: float
    dof: int
    trend: VarianceTrend | None
    runs: pd.DataFrame  # the usable runs with POINT, SIGMA, SIGMA_LOG, W_LOSS, W_LOG of their point

    @property
    def weighted(self) -> bool:
        """Whether the fits take weights: only when the noise varies with N, D (else every weight would be equal)."""
        return self.trend is not None and self.trend.used

    def weighting(self) -> str:
        """How the fits were weighted, in words (the report says it)."""
        if self.weighted:
            g0, g1, g2 = self.trend.gamma
            return (f"weighted by 1/sigma^2, sigma from the variance function log sigma_log^2 = {g0:.3g} "
                    f"{g1:+.3g} log N {g2:+.3g} log D fitted to the {self.trend.n_points} replicated points (Harvey "
                    f"1976; its slopes pass an F test, p = {self.trend.p_value:.2g}); Approach 3 scales each "
                    "log-loss residual by sqrt(w / mean w) before the Huber, Approach 2's parabolas and Kaplan's "
                    "L(N), L(D) weight squared residuals by w")
        why = (f"its slopes in log N, log D fail an F test, p = {self.trend.p_value:.2g} >= {TREND_LEVEL}"
               if self.trend is not None else f"fewer than {MIN_POINTS_FOR_TREND} replicated points to fit a trend")
        return (f"unweighted: the seed noise is taken as the same relative sigma everywhere ({why}), so every run "
                "weighs the same and a point weighs by its number of seeds")

    def as_dict(self) -> dict:
        cols = [POINT, *POINT_KEYS, "n", "n_seeds", "seeds", "loss", SIGMA, "rel_sigma", SIGMA_LOG, "replicated",
                "sigma_used", "sigma_log_used"]
        pts = self.points[cols].astype(object).where(self.points[cols].notna(), None)
        trend = dataclasses.asdict(self.trend) if self.trend is not None else None
        return {"n_points": int(len(self.points)), "n_replicated": int(self.points["replicated"].sum()),
                "n_runs": int(self.points["n"].sum()), "pooled_sigma_log": self.pooled_sigma_log, "dof": self.dof,
                "trend": trend, "weighted": self.weighted, "weighting": self.weighting(),
                "points": pts.to_dict("records")}


def seed_noise(runs: pd.DataFrame) -> SeedNoise | None:
    """The noise model of the usable runs `runs`; None when no point has seed replicates (the fits then run exactly
    as without this module). Every run carries its point's sigma, so a point of n runs weighs n / sigma^2 in all, the
    inverse variance of its mean. sigma_used = sigma_log_used x the point's mean loss (sd(L) ~ L sd(log L))."""
    if not has_replicates(runs):
        return None
    points = replicate_points(runs)
    pooled, dof = pooled_sigma_log(points)
    trend = variance_trend(points)
    sigma_log = trend.sigma_log(points["N"], points["D"]) if trend is not None and trend.used else \
        np.full(len(points), pooled)
    points = points.assign(sigma_log_used=sigma_log, sigma_used=sigma_log * points["loss"])
    by_point = points.set_index(POINT)
    ids = point_ids(runs)
    out = runs.assign(**{POINT: ids.to_numpy(), SIGMA: by_point.loc[ids, "sigma_used"].to_numpy(float),
                         SIGMA_LOG: by_point.loc[ids, "sigma_log_used"].to_numpy(float)})
    out[W_LOSS], out[W_LOG] = 1.0 / out[SIGMA] ** 2, 1.0 / out[SIGMA_LOG] ** 2
    return SeedNoise(points=points, pooled_sigma_log=pooled, dof=dof, trend=trend, runs=out)


def point_means(noise: SeedNoise) -> pd.DataFrame:
    """One row per point: POINT_KEYS, loss (mean over its runs), n and W_LOG = n / sigma_log^2, the inverse variance of
    the mean's log (the weight of a fit on point means: Kaplan's L(N), L(D))."""
    p = noise.points
    return p[[*POINT_KEYS, "loss", "n"]].assign(**{W_LOG: p["n"] / p["sigma_log_used"] ** 2})

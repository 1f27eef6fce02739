"""Quality flags for IsoFLOP curves, before anyone trusts their minima (Approach 2, Hoffmann et al. 2022 sec. 3.2).

The checks follow Open-Athena's IsoFLOP QC (Open-Athena/scaling-law-analysis, data/transform.py: off-centre,
weak-curvature, leave-one-out spline outliers, near-duplicate sizes) but only flag: nothing is dropped, the report
shows the flags and the IsoFLOP figure marks the points, and the researcher decides.

Per budget (the runs of one planned C):
- off-centre minimum: the lowest loss is at the smallest or largest size, or the fitted parabola's minimum lies
  outside the inner sizes [2nd smallest, 2nd largest] (at or next to an edge of the sampled N range): the curve's
  minimum rests on one or two points, and the parabola extrapolates it.
- weak curvature: the parabola's curvature c2 (loss = c0 + c1 x + c2 x^2, x = ln N, as analysis.laws.fits fits it) is
  not significantly > 0: the lower end of its two-sided `curvature_level` t interval (from the least-squares covariance,
  n - 3 degrees of freedom) is <= 0. A flat curve places its minimum anywhere.
Per run:
- spline outlier: its log loss is more than `spline_k` robust sigmas from a leave-one-out Akima spline through the
  budget's other sizes (the interpolant Porian et al. 2024 use for IsoFLOP minima); sigma = 1.4826 MAD of these
  residuals pooled over all budgets (Open-Athena's robust z, threshold 6). Unlike Open-Athena, only interior sizes
  are checked (an end size would be extrapolated, which on synthetic sweeps of 5-9 sizes flagged clean runs), each
  residual is first divided by the spread it would have under unit i.i.d. noise at those sizes (simulated), and the
  check is skipped below MIN_SPLINE_RUNS checkable runs, whose MAD is too noisy a sigma.
- near-duplicate size: another size of the same budget within `near_duplicate` (relative) of its N: two points that
  are nearly one point give the parabola false confidence near them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy import interpolate, stats

from analysis.laws.fits import isoflop_key

MAD_TO_SIGMA = 1.4826  # sigma of a normal distribution = 1.4826 x its median absolute deviation


@dataclasses.dataclass(frozen=True)
class QualityRules:
    near_duplicate: float = 0.03  # sizes within 3% of each other
    spline_k: float = 6.0  # robust z beyond which a run is a spline outlier
    curvature_level: float = 0.95  # two-sided level of the curvature's t interval

    def __post_init__(self):
        for name, v, ok in (("near_duplicate", self.near_duplicate, 0 <= self.near_duplicate < 1),
                            ("spline_k", self.spline_k, self.spline_k > 0),
                            ("curvature_level", self.curvature_level, 0 < self.curvature_level < 1)):
            if not ok:
                raise ValueError(f"quality rule {name}={v}: use near_duplicate in [0, 1) (e.g. 0.03 for 3%), "
                                 "spline_k > 0 (e.g. 6), curvature_level in (0, 1) (e.g. 0.95)")


@dataclasses.dataclass(frozen=True)
class IsoflopQuality:
    budgets: pd.DataFrame  # one row per budget: off_centre, weak_curvature, counts, flags
    points: pd.DataFrame  # one row per run: name, budget, N, loss, spline_z, flags (";"-joined), detail
    rules: QualityRules
    spline_sigma: float  # robust sigma of the scaled leave-one-out log-loss residuals (NaN: check skipped)
    note: str = ""  # why the spline check was skipped, if it was

    @property
    def flagged(self) -> pd.DataFrame:
        return self.points[self.points["flags"] != ""]

    def as_dict(self) -> dict:
        return {"rules": dataclasses.asdict(self.rules), "spline_sigma": self.spline_sigma, "note": self.note,
                "budgets": self.budgets.to_dict("records"),
                "flagged_points": self.flagged.drop(columns=["spline_z"]).to_dict("records")}


def _curvature(x, loss, level: float) -> tuple[float, float | None, float | None]:
    """(c2, lower end of its t interval or None when n <= 3, parabola minimum x* or None when c2 <= 0)."""
    if len(x) <= 3:
        c2, c1, _ = np.polyfit(x, loss, 2)
        lo = None
    else:
        (c2, c1, _), cov = np.polyfit(x, loss, 2, cov=True)
        lo = float(c2 - stats.t.ppf((1 + level) / 2, len(x) - 3) * np.sqrt(cov[0, 0]))
    return float(c2), lo, (float(-c1 / (2 * c2)) if c2 > 0 else None)


# Fewer checked (interior) runs than this and their MAD is too noisy a sigma (one quiet budget makes a noisy one look
# like outliers): the spline check is then skipped and the report says so.
MIN_SPLINE_RUNS = 12
N_NOISE_DRAWS = 200  # unit-noise draws that calibrate each leave-one-out residual's spread


def _loo_akima(xs, ys_SxM) -> np.ndarray:
    """Leave-one-out Akima predictions at each of the S sizes xs, for M columns of values at once: (S, M)."""
    pred = np.empty_like(ys_SxM)
    for j in range(len(xs)):
        rest = np.arange(len(xs)) != j
        pred[j] = interpolate.Akima1DInterpolator(xs[rest], ys_SxM[rest], extrapolate=True)(xs[j])
    return pred


def _loo_residuals(x, logL) -> tuple[np.ndarray, np.ndarray]:
    """(residual, scale) per run of an interior size: its log loss minus the leave-one-out Akima spline through the
    other sizes, and the SD that residual has under unit i.i.d. noise at these sizes (simulated: sizes with wider gaps
    to their neighbours are predicted less precisely). NaN at the smallest and largest size, and everywhere when
    fewer than 4 sizes leave nothing to interpolate from."""
    s = pd.Series(logL).groupby(x).mean()  # one value per size: seed replicates predict together
    xs, ys = s.index.to_numpy(), s.to_numpy()
    resid, scale = np.full(len(x), np.nan), np.full(len(x), np.nan)
    if len(xs) < 4:
        return resid, scale
    noise_SxM = np.random.default_rng(0).standard_normal((len(xs), N_NOISE_DRAWS))
    amp_S = (noise_SxM - _loo_akima(xs, noise_SxM)).std(axis=1)
    pred_S = _loo_akima(xs, ys[:, None])[:, 0]
    for j, xj in enumerate(xs[1:-1], start=1):  # interior sizes only: see the module docstring
        at = x == xj
        resid[at], scale[at] = logL[at] - pred_S[j], amp_S[j]
    return resid, scale


def isoflop_quality(df: pd.DataFrame, rules: QualityRules | None = None) -> IsoflopQuality:
    """Flag each budget's IsoFLOP curve and its runs (module docstring); `df` is a run table (analysis.load) whose
    runs carry a planned budget."""
    rules = rules or QualityRules()
    missing = [c for c in ("name", "N", "loss") if c not in df.columns]
    if missing:
        raise ValueError(f"isoflop quality: the run table lacks columns {missing}; load it with analysis.load")
    if isoflop_key(df) != "budget":
        raise ValueError("isoflop quality: the runs carry no planned budget (column 'budget'), so there are no "
                         "IsoFLOP curves to check; plan the sweep as an IsoFLOP grid or give the CSV a budget column")
    key = "budget"
    rows, points = [], []
    for budget, g in df.groupby(key, sort=True):
        g = g.sort_values("N")
        x, loss = np.log(g["N"].to_numpy(float)), g["loss"].to_numpy(float)
        xs = np.unique(x)
        flags = [[] for _ in range(len(g))]
        details = [[] for _ in range(len(g))]
        # Near-duplicate sizes: neighbouring distinct sizes closer than the tolerance (ratio - 1 <= tol).
        close = np.diff(xs) <= np.log1p(rules.near_duplicate)
        dup_sizes = set()
        for j in np.flatnonzero(close):
            dup_sizes |= {xs[j], xs[j + 1]}
            pct = (np.exp(xs[j + 1] - xs[j]) - 1) * 100
            for i in np.flatnonzero(np.isin(x, xs[j:j + 2])):
                if "near_duplicate" not in flags[i]:
                    flags[i].append("near_duplicate")
                details[i].append(f"N={np.exp(xs[j]):.4g} and N={np.exp(xs[j + 1]):.4g} differ by {pct:.1f}%")
        row = {"budget": float(budget), "n_runs": len(g), "n_sizes": len(xs), "N_lowest": None, "N_min": None,
               "min_position": None, "off_centre": None, "curvature": None, "curvature_lo": None,
               "weak_curvature": None, "n_near_duplicate": len(dup_sizes), "flags": "", "note": ""}
        if len(xs) >= 3:
            means = pd.Series(loss).groupby(x).mean()
            i_low = int(np.argmin(means.to_numpy()))
            c2, c2_lo, x_min = _curvature(x, loss, rules.curvature_level)
            row.update(N_lowest=float(np.exp(xs[i_low])), curvature=c2, curvature_lo=c2_lo)
            if x_min is not None:
                row.update(N_min=float(np.exp(x_min)), min_position=float((x_min - xs[0]) / (xs[-1] - xs[0])))
            # Off-centre: the minimum at or next to an edge (module docstring).
            inner = (xs[1], xs[-2]) if len(xs) >= 4 else (xs[0], xs[-1])
            row["off_centre"] = bool(i_low in (0, len(xs) - 1) or x_min is None
                                     or not inner[0] <= x_min <= inner[1])
            if c2_lo is None:
                row["note"] = "3 sizes: curvature untested (no residual degree of freedom)"
            row["weak_curvature"] = bool(c2 <= 0 or (c2_lo is not None and c2_lo <= 0))
        else:
            row["note"] = f"{len(xs)} size(s): no curve to check"
        resid, scale = _loo_residuals(x, np.log(loss))
        for i, r in enumerate(g.itertuples()):
            points.append({"name": r.name, "budget": float(budget), "N": float(r.N), "loss": float(r.loss),
                           "resid": resid[i], "scale": scale[i], "flags": flags[i], "detail": details[i]})
        rows.append(row)
    pts = pd.DataFrame(points)
    # Robust z of the leave-one-out residuals, pooled over budgets so that one curve's noise calibrates another's.
    r = pts["resid"].to_numpy(float)
    u = r / pts["scale"].to_numpy(float)  # residuals in units of their own noise amplification
    ok = np.isfinite(u)
    med = np.median(u[ok]) if ok.sum() >= MIN_SPLINE_RUNS else np.nan
    sigma = MAD_TO_SIGMA * np.median(np.abs(u[ok] - med)) if ok.sum() >= MIN_SPLINE_RUNS else np.nan
    pts["spline_z"] = np.abs(u - med) / sigma if sigma > 0 else np.nan
    spline_note = "" if sigma > 0 else (f"spline check skipped: {int(ok.sum())} interior runs (need "
                                        f"{MIN_SPLINE_RUNS}) to calibrate the noise")
    for i, z in enumerate(pts["spline_z"]):
        if np.isfinite(z) and z > rules.spline_k:
            pts.at[i, "flags"] = pts.at[i, "flags"] + ["spline_outlier"]
            pts.at[i, "detail"] = pts.at[i, "detail"] + [
                f"log loss {r[i]:+.3g} from the leave-one-out spline ({z:.1f} robust sigmas)"]
    budgets = pd.DataFrame(rows)
    n_out = pts[pts["flags"].map(lambda f: "spline_outlier" in f)].groupby("budget").size()
    budgets["n_spline_outliers"] = budgets["budget"].map(n_out).fillna(0).astype(int)
    budgets["flags"] = [";".join(f for f, on in (("off_centre", b.off_centre), ("weak_curvature", b.weak_curvature),
                                                 ("spline_outlier", b.n_spline_outliers > 0),
                                                 ("near_duplicate", b.n_near_duplicate > 0)) if on)
                        for b in budgets.itertuples()]
    pts["flags"] = pts["flags"].map(";".join)
    pts["detail"] = pts["detail"].map("; ".join)
    return IsoflopQuality(budgets=budgets, points=pts.drop(columns=["resid", "scale"]), rules=rules,
                          spline_sigma=float(sigma), note=spline_note)


def quality_markdown(q: dict | None) -> list[str]:
    """The report's "IsoFLOP quality flags" section from IsoflopQuality.as_dict() (None: no section)."""
    if not q:
        return []
    L = ["", "## IsoFLOP quality flags", ""]
    if "error" in q:
        return L + [f"Not checked: {q['error']}"]
    r = q["rules"]
    L += ["Flags, not exclusions: every run stays in the fits (analysis.checks.quality, after Open-Athena's IsoFLOP "
          "QC). off_centre: the lowest loss at the smallest or largest size, or the parabola's minimum outside the "
          f"inner sizes; weak_curvature: the parabola's curvature not > 0 at {r['curvature_level']:.0%} (t interval); "
          f"spline_outlier: a run > {r['spline_k']:g} robust sigmas from a leave-one-out spline through its budget; "
          f"near_duplicate: two sizes within {r['near_duplicate']:.0%}.", "",
          "| budget C | runs | sizes | lowest-loss N | parabola min N (position) | curvature [lower 95%] | flags |",
          "|---|---|---|---|---|---|---|"]

    def g(v, fmt=".3g"):
        return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)

    for b in q["budgets"]:
        pos = f" ({b['min_position']:.2f})" if b["min_position"] is not None else ""
        curv = f"{g(b['curvature'])} [{g(b['curvature_lo'])}]"
        flags = b["flags"].replace(";", ", ") or "none"
        L.append(f"| {b['budget']:.3g} | {b['n_runs']} | {b['n_sizes']} | {g(b['N_lowest'], '.4g')} | "
                 f"{g(b['N_min'], '.4g')}{pos} | {curv} | {flags}{' (' + b['note'] + ')' if b['note'] else ''} |")
    pts = q["flagged_points"]
    if q.get("note"):
        L += ["", f"Note: {q['note']}."]
    L += ["", "Position: where the parabola's minimum sits in the sampled ln N range (0 = smallest size, 1 = largest)."]
    if pts:
        L += ["", "Flagged runs (marked on the IsoFLOP figure):", "", "| run | budget C | N | loss | flags | why |",
              "|---|---|---|---|---|---|"]
        L += [f"| {p['name']} | {p['budget']:.3g} | {p['N']:.4g} | {p['loss']:.4g} | {p['flags'].replace(';', ', ')} | "
              f"{p['detail']} |" for p in pts]
    else:
        L += ["", "No run is a near-duplicate size." if q.get("note") else
              "No run is a spline outlier or a near-duplicate size."]
    return L

"""Is a parameter identified by the data? Bootstrap intervals that run away are reported as "not identified".

A percentile interval such as A in [25.68, 2.037e+132] or alpha in [0.57, 34.3] is not an uncertainty, it is the
bootstrap telling us the data do not pin the parameter down. Raue et al. 2009 ("Structural and practical
identifiability analysis of partially observed dynamical models by exploiting the profile likelihood",
Bioinformatics 25(15):1923, sec. 2.3) call a parameter *practically non-identifiable* when its likelihood-based
confidence interval extends to infinity in at least one direction although the fit has a unique optimum. We apply
the same test to the bootstrap distribution, in each parameter's natural scale:

- scale parameters (E, A, B, G, prefactors, N_opt, D_opt, L_opt: positive, fitted as logs) are not identified when the
  95% interval reaches 0 or spans more than MAX_DECADES decades: in log space it is running off towards -inf or +inf;
  E also when its estimate sits on its bound 0 (below 10^-MAX_DECADES of L_opt), however narrow the interval: a fit
  stuck on a bound does not move under resampling, which is not certainty;
- exponents (alpha, beta, a, b) are not identified when the interval is wider than the range a credible exponent lies
  in (alpha, beta in [0, 2], the span of Hoffmann et al. 2022's initialisation grid, appendix D.2; a, b in [0, 1],
  since N_opt and D_opt both grow with C), lies outside it, or reaches a bound of the fit (alpha, beta > 0, and VPNLS's
  search box; for Approach 3, a = beta/(alpha+beta) and b in (0, 1));
- the whole fit is not identified when more than MAX_FAILED of the resampled fits failed (the fit does not exist
  for a large share of the data sets we could have drawn).

A derived quantity (N_opt(C), D_opt(C), L_opt(C), G, a, b of Approach 3) is judged by its own interval and also
names the not-identified parameters it depends on: its interval is then conditional on a boundary-hitting fit, where
percentile bootstrap intervals lose their coverage guarantee (Andrews 2000, Econometrica 68(2):399).
"""

from __future__ import annotations

import dataclasses
import math

from analysis.laws.approach3 import VPNLS_BOX
from analysis.checks.uncertainty import Approach1Stat, Approach2Stat, Approach3Stat

MAX_DECADES = 3.0  # a scale parameter known only to a factor > 1000 is, in log space, running away
MAX_FAILED = 0.2  # share of resampled fits that may fail before the whole fit is called not identified
BOUND_TOL = 0.01  # an endpoint within 1% of the plausible width from a hard bound has run into it


@dataclasses.dataclass(frozen=True)
class Rule:
    kind: str  # "scale" (positive, judged in decades) or "exponent" (judged against its plausible range)
    plausible: tuple[float, float] | None = None  # exponents: the range a credible value lies in
    hard: tuple[float | None, float | None] = (None, None)  # bounds of the parameter space a fit can run into
    ref: str | None = None  # scale parameters bounded below by 0: the quantity whose size says "E is ~0 next to it"


SCALE = Rule("scale")
# E >= 0 is a hard bound of both fitters (VPNLS's nonnegative least squares; exp(e) in the Huber fit, whose e can run
# off to -inf): an E estimate far below the loss sits on it, however narrow the resamples keep it there.
RULES = {k: SCALE for k in ("A", "B", "G", "k_N", "k_D", "N_opt", "D_opt", "L_opt")} | {
    "E": Rule("scale", hard=(0.0, None), ref="L_opt"),
    "alpha": Rule("exponent", (0.0, 2.0), (0.0, None)), "beta": Rule("exponent", (0.0, 2.0), (0.0, None)),
    "a": Rule("exponent", (0.0, 1.0)), "b": Rule("exponent", (0.0, 1.0))}
# Approach 3's a, b are beta/(alpha+beta) and alpha/(alpha+beta): inside (0, 1) by construction, so an endpoint at
# 0 or 1 is alpha or beta running away.
A3_RULES = RULES | {"a": Rule("exponent", (0.0, 1.0), (0.0, 1.0)), "b": Rule("exponent", (0.0, 1.0), (0.0, 1.0))}
# VPNLS searches alpha, beta in a box: a fit on its wall has run into it, however narrow the resamples keep it there.
VPNLS_RULES = A3_RULES | {k: Rule("exponent", (0.0, 2.0), VPNLS_BOX) for k in ("alpha", "beta")}

# What each derived quantity is computed from (Hoffmann et al. 2022 eq. 4 for Approach 3). For Approaches 1 and 2,
# N_opt = k_N C^a depends on the exponent only: k_N is N_opt at C = 1 FLOP, an extrapolation so far outside the
# data that its interval is wide whenever a is uncertain, while N_opt at C (near the data) stays well determined.
DEPENDS = {
    Approach3Stat: {"a": ("alpha", "beta"), "b": ("alpha", "beta"), "G": ("A", "B", "alpha", "beta"),
                    "N_opt": ("A", "B", "alpha", "beta"), "D_opt": ("A", "B", "alpha", "beta"),
                    "L_opt": ("E", "A", "B", "alpha", "beta")},
    Approach2Stat: {"N_opt": ("a",), "D_opt": ("b",)},
    Approach1Stat: {"N_opt": ("a",), "D_opt": ("b",)},
}
NOTES = {"k_N": "k_N is N_opt at C = 1 FLOP, far outside the data: read N_opt at C instead",
         "k_D": "k_D is D_opt at C = 1 FLOP, far outside the data: read D_opt at C instead"}


def rules_for(stat) -> dict:
    if isinstance(stat, Approach3Stat):
        return VPNLS_RULES if stat.method == "vpnls" else A3_RULES
    return RULES


def _g(v: float) -> str:
    return f"{v:.4g}"


def interval_problem(key: str, lo: float, hi: float, rule: Rule, estimate: float | None = None,
                     ref: float | None = None) -> str | None:
    """Why the 95% interval [lo, hi] of `key` (and its `estimate`) shows it is not identified, or None when it is.
    `ref`: the size of rule.ref's quantity, against which a scale estimate near 0 has run into its bound."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"the 95% interval [{_g(lo)}, {_g(hi)}] is not finite"
    where = f"the 95% interval [{_g(lo)}, {_g(hi)}]"
    if rule.kind == "scale":
        upper_only = f"the data give only an upper limit, {key} <= {_g(hi)}"
        if estimate is not None and ref and estimate < ref * 10 ** -MAX_DECADES:
            return (f"the fit puts {key} = {_g(estimate)} on its bound 0 ({rule.ref} = {_g(ref)}); "
                    f"{upper_only}")
        if lo <= 0:
            return f"{where} reaches the bound {key} = 0: {upper_only}"
        decades = math.log10(hi / lo)
        if decades <= MAX_DECADES:
            return None
        what = f"{where} spans {decades:.1f} decades (more than {MAX_DECADES:g})"
        if key in NOTES:
            return f"{what}; {NOTES[key]}"
        if estimate is not None and estimate > 0:  # name the side that runs away
            down, up = math.log10(estimate / lo), math.log10(hi / estimate)
            if max(down, up) > MAX_DECADES:
                return (f"{what}, its lower end running towards {key} = 0: {upper_only}" if down > up else
                        f"{what}, its upper end running off: the data give only a lower limit, {key} >= {_g(lo)}")
        return what
    p_lo, p_hi = rule.plausible
    width = p_hi - p_lo
    h_lo, h_hi = rule.hard
    if h_lo is not None and lo <= h_lo + BOUND_TOL * width:
        return f"{where} runs into the bound {key} = {h_lo:g}"
    if h_hi is not None and hi >= h_hi - BOUND_TOL * width:
        return f"{where} runs into the bound {key} = {h_hi:g}"
    if hi - lo > width:
        return f"{where} is wider than the plausible range {p_lo:g} <= {key} <= {p_hi:g}"
    if hi < p_lo or lo > p_hi:
        return f"{where} lies outside the plausible range {p_lo:g} <= {key} <= {p_hi:g}"
    return None


def identification(stat, ci: dict, n_resamples: int, n_failed: int, estimate: dict | None = None) -> dict:
    """{key: {"identified": bool, "reason": str | None, "depends_on": [not-identified inputs]}} for every key of
    `ci` that has a rule; keys without one (e.g. counts) are left out."""
    rules = rules_for(stat)
    total = n_resamples + n_failed
    fit_failed = None
    if total and n_failed / total > MAX_FAILED:
        fit_failed = (f"{n_failed} of {total} resampled fits failed (more than {MAX_FAILED:.0%}): the fit does not "
                      "exist for many of the data sets the runs could have given")
    out = {}
    for key, (lo, hi) in ci.items():
        if key not in rules:
            continue
        est = (estimate or {}).get(key)
        ref = (estimate or {}).get(rules[key].ref) if rules[key].ref else None
        reason = fit_failed or interval_problem(key, float(lo), float(hi), rules[key],
                                                est if isinstance(est, float) else None,
                                                ref if isinstance(ref, float) else None)
        out[key] = {"identified": reason is None, "reason": reason, "depends_on": []}
    for key, inputs in DEPENDS.get(type(stat), {}).items():
        if key in out:
            out[key]["depends_on"] = [p for p in inputs if p in out and not out[p]["identified"]]
    return out


def mark_identification(d: dict, stat) -> dict:
    """A bootstrap result dict (BootstrapResult.as_dict()) with "identification" added and, for every key that is
    not identified, its ci95 entry set to None: the numbers stay only as evidence inside the reason."""
    ident = identification(stat, d.get("ci95", {}), d.get("n_resamples", 0), d.get("n_failed", 0), d)
    ci = {k: (None if k in ident and not ident[k]["identified"] else v) for k, v in d.get("ci95", {}).items()}
    return d | {"ci95": ci, "identification": ident}


def describe(key: str, ident: dict | None) -> str | None:
    """One line for a report: 'not identified (reason)', 'depends on not-identified X, Y', or None."""
    if not ident or key not in ident:
        return None
    i = ident[key]
    if not i["identified"]:
        return f"not identified ({i['reason']})"
    if i["depends_on"]:
        return f"depends on not-identified {', '.join(i['depends_on'])}"
    return None

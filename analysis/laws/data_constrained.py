"""The data-constrained scaling law (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models", eq. 5):
repeated tokens and excess parameters are worth less than fresh ones, with an exponential decay of their value.

  L(N, D, U_D) = E + A / N'^alpha + B / D'^beta                                                       (eq. 5)
  D' = U_D + U_D R_D* (1 - exp(-R_D / R_D*)),  R_D = D / U_D - 1   (repetitions beyond the first epoch)
  N' = U_N + U_N R_N* (1 - exp(-R_N / R_N*)),  R_N = N / U_N - 1   (parameters beyond U_N)
  U_N = min(N, N_opt(U_D)): the compute-optimal size for U_D tokens by Hoffmann et al. 2022 eq. 4 with the law's own
        A, B, alpha, beta: N_opt(D) = G (G D)^(beta/alpha), G = (alpha A / (beta B))^(1/(alpha+beta))
A repeated token is worth at most R_D* fresh ones in total: D' -> U_D (1 + R_D*) as epochs grow.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from analysis.laws.approach3 import constrained_optimum
from analysis.laws.law import CHINCHILLA, Law, LawStat, Param, fit_law, fit_with_intervals

DC_EXPRESSION = """
G = (alpha*A/(beta*B))**(1/(alpha + beta))
U_N = minimum(N, G*(G*U_D)**(beta/alpha))
R_N = N/U_N - 1
R_D = maximum(D/U_D - 1, 0)
E + A/(U_N + U_N*R_N_star*(1 - exp(-R_N/R_N_star)))**alpha + B/(U_D + U_D*R_D_star*(1 - exp(-R_D/R_D_star)))**beta
"""
_R_GRID = (1.0, 5.0, 15.0, 50.0)

DATA_CONSTRAINED = Law(
    name="data_constrained", inputs=("N", "D", "U_D"), expression=DC_EXPRESSION,
    params=CHINCHILLA.params + (Param("R_D_star", 1e-2, 1e4, _R_GRID, log=True),
                                Param("R_N_star", 1e-2, 1e4, _R_GRID, log=True)),
    reference="Muennighoff et al. 2023 eq. 5")
CHINCHILLA_NAMES = CHINCHILLA.param_names

# The paper's fit on its C4 runs (R_D* ~ 15.4, R_N* ~ 5.3 in the text), to the digits the authors' repository
# (huggingface/datablations, README "Parametric Fit") lists them: a = log A, b = log B, e = log E as there.
PUBLISHED = {"E": math.exp(0.6254804), "A": math.exp(6.255414), "B": math.exp(7.3049974), "alpha": 0.3526596,
             "beta": 0.3526596, "R_D_star": 15.387756, "R_N_star": 5.309743}


def effective_data(U_D, epochs, R_D_star: float):
    """D' of eq. 5: U_D fresh tokens seen `epochs` times are worth D' fresh ones."""
    R_D = np.maximum(np.asarray(epochs, float) - 1, 0)
    return U_D * (1 + R_D_star * (1 - np.exp(-R_D / R_D_star)))


def loss(params: dict, N, D, U_D) -> np.ndarray:
    return DATA_CONSTRAINED({"N": N, "D": D, "U_D": U_D}, params)


class _TokenCost:
    """C = k N D (k FLOPs per parameter per token, 6 in Kaplan et al. 2020 eq. 2.1): D on the budget line."""

    def __init__(self, k: float):
        self.k = k

    def D(self, N, C):
        return np.asarray(C, float) / (self.k * np.asarray(N, float))


def optimal_allocation(params: dict, C: float, U_max: float, *, flops_per_token: float = 6.0,
                       N_range: tuple[float, float] | None = None) -> dict:
    """The (N, D, epochs) minimising the fitted loss at compute C = k N D when at most U_max unique tokens exist:
    each D uses U_D = min(U_max, D) unique tokens, repeated D / U_D times (Muennighoff et al. 2023 sec. 3: the optimum
    moves to fewer parameters and more epochs than Chinchilla's once data runs out)."""
    if not (C > 0 and U_max > 0 and flops_per_token > 0):
        raise ValueError(f"optimal allocation: C={C!r}, U_max={U_max!r} and flops_per_token={flops_per_token!r} must "
                         "all be positive")
    cost = _TokenCost(flops_per_token)
    if N_range is None:  # around the unconstrained optimum C / k = N D with D ~ N, six decades each way
        mid = math.sqrt(C / flops_per_token)
        N_range = (mid * 1e-6, mid * 1e6)

    def L(N, D):
        return loss(params, N, D, np.minimum(U_max, D))

    N, D, L_opt = constrained_optimum(L, C, cost, N_range)
    U = min(U_max, D)
    return {"C": float(C), "U_max": float(U_max), "N": N, "D": D, "epochs": D / U, "loss": L_opt}


@dataclasses.dataclass(frozen=True)
class DataConstrainedStat(LawStat):
    """The law's parameters and, with C and U_max, the data-limited optimum (picklable, for the bootstrap)."""

    C: float | None = None
    U_max: float | None = None
    flops_per_token: float = 6.0

    def __call__(self, df: pd.DataFrame) -> dict:
        fit = self.fit(df)
        out = {k: float(v) for k, v in fit.params.items() if k not in (self.fixed or {})}
        if self.C is not None and self.U_max is not None:
            opt = optimal_allocation(fit.params, self.C, self.U_max, flops_per_token=self.flops_per_token)
            out.update({f"opt_{k}": opt[k] for k in ("N", "D", "epochs", "loss")})
        return out


def single_epoch(df: pd.DataFrame, tol: float = 0.05) -> pd.DataFrame:
    """Runs that saw their data about once (epochs <= 1 + tol): the points of a Chinchilla fit."""
    return df[df["epochs"] <= 1 + tol]


def fit_data_constrained(df: pd.DataFrame, *, two_stage: str | bool = "auto", C: float | None = None,
                         U_max: float | None = None, n_bootstrap: int = 200, seed: int = 0, n_jobs: int = 2) -> dict:
    """Fit eq. 5 with bootstrap intervals. Two stages (Chinchilla's E, A, B, alpha, beta on single-epoch runs first,
    then R_D*, R_N* on all runs with those held; the authors fit their C4 coefficients separately too) when `two_stage` is True, or "auto" and at least 10
    single-epoch runs over 3 sizes exist; otherwise all 7 parameters at once. With C and U_max (default: 10x the
    largest run's C, its unique tokens), also the compute-optimal allocation under that data limit."""
    if "epochs" not in df.columns or not np.isfinite(df["epochs"].to_numpy(float)).all():
        raise ValueError("data-constrained law: the runs need epochs (D / unique tokens) for U_D; use a sweep "
                         "directory or runs.csv from records that carry epochs")
    one = single_epoch(df)
    if two_stage == "auto":
        two_stage = len(one) >= 10 and one["N"].nunique() >= 3
    fixed = None
    if two_stage:
        stage1 = fit_law(CHINCHILLA, one)
        fixed = {k: stage1.params[k] for k in CHINCHILLA_NAMES}
    if C is None:
        C = float(df["C"].max()) * 10 if "C" in df.columns else None
    if U_max is None:
        U_max = float((df["D"] / df["epochs"]).max())
    fpt = float(np.median(df["C"] / (df["N"] * df["D"]))) if "C" in df.columns else 6.0
    res = fit_with_intervals(DATA_CONSTRAINED, df, n_bootstrap=n_bootstrap, seed=seed, n_jobs=n_jobs, fixed=fixed,
                             stat_type=DataConstrainedStat, C=C, U_max=U_max, flops_per_token=fpt)
    fit = res["fit"]
    # The paper's symbols at the top level with ci95 beside them, as the approaches' results (report, wandb).
    out = {"law": DATA_CONSTRAINED.name, "reference": DATA_CONSTRAINED.reference,
           "stages": ("two stages (Chinchilla's E, A, B, alpha, beta on the single-epoch runs, then R_D*, R_N*)"
                      if two_stage else "one stage (all 7 parameters at once)"),
           **fit.params, "param_names": list(DATA_CONSTRAINED.param_names), "held": list(fit.fixed),
           "ci95": res["ci95"], "n_resamples": res["n_resamples"], "n_failed": res["n_failed"],
           "n_points": fit.n_points, "at_bound": list(fit.at_bound), "max_epochs": float(df["epochs"].max()),
           "flops_per_token": fpt}
    if C is not None:
        try:
            out["allocation"] = optimal_allocation(fit.params, C, U_max, flops_per_token=fpt)
        except ValueError as exc:
            out["allocation"] = {"error": str(exc)}
    return out | {"_fit": fit}


def markdown_section(res: dict) -> list[str]:
    """The report's "Data-constrained law" section."""
    L = ["", "## Data-constrained law (Muennighoff et al. 2023, eq. 5)", ""]
    if "error" in res:
        return L + [f"Not fitted: {res['error']}"]
    ci = res.get("ci95", {})
    L += [f"The runs repeat their data up to {res['max_epochs']:.3g} epochs. L = E + A/N'^alpha + B/D'^beta with "
          "effective data D' = U_D (1 + R_D* (1 - exp(-R_D/R_D*))), R_D = epochs - 1, and effective parameters N' "
          f"likewise with R_N*; fitted in {res['stages']} on {res['n_points']} runs.", "",
          "| symbol | estimate | 95% interval | published (C4) |", "|---|---|---|---|"]
    for k in res["param_names"]:
        lo_hi = ci.get(k)
        cell = f"[{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else "held from stage 1" if k in res["held"] else "-"
        L.append(f"| {k} | {res[k]:.4g} | {cell} | {PUBLISHED[k]:.4g} |")
    if res.get("at_bound"):
        L += ["", f"At a bound of its search range (not identified by these runs): {', '.join(res['at_bound'])}. "
              "The allocation below extrapolates such a fit and is no prediction to rely on."]
    if res.get("n_resamples"):
        L += ["", f"{res['n_resamples']} bootstrap resamples over runs, {res['n_failed']} failed fits."]
    a = res.get("allocation")
    if a and "error" not in a:
        L += ["", f"Compute-optimal under a data limit: at C = {a['C']:.3g} FLOPs with at most {a['U_max']:.3g} "
              f"unique tokens, N = {a['N']:.4g}, D = {a['D']:.4g} tokens ({a['epochs']:.3g} epochs), predicted loss "
              f"{a['loss']:.4f}."]
        if "opt_N" in ci:
            L.append(f"95% intervals: N [{ci['opt_N'][0]:.4g}, {ci['opt_N'][1]:.4g}], epochs "
                     f"[{ci['opt_epochs'][0]:.3g}, {ci['opt_epochs'][1]:.3g}].")
    elif a:
        L += ["", f"Compute-optimal allocation under the data limit: not found ({a['error']})."]
    return L

"""Chinchilla Approach 3 (Hoffmann et al. 2022 sec. 3.3): the parametric loss L(N, D) = E + A/N^alpha + B/D^beta.

Two fitters: the paper's (Huber on log loss, log-sum-exp parameters, L-BFGS from a grid, appendix D.2) and a
variable-projection least-squares form (closed-form E, A, B >= 0 for each (alpha, beta)), fast enough to bootstrap.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import optimize, special

from analysis.laws.fits import FLOPS_PER_TOKEN, relative_weights
from analysis.validate import check_min_points, check_positive_finite


@dataclasses.dataclass(frozen=True)
class Approach3Fit:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022 eq. 2)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    n_points: int
    objective: float
    method: str
    flops_per_token: float = FLOPS_PER_TOKEN

    def __call__(self, N, D):
        N, D = np.asarray(N, float), np.asarray(D, float)
        # A bootstrap refit can run off to a huge exponent or an overflowed A (fit_approach3): N^alpha = inf gives its
        # term 0, as it should, and inf / inf gives nan; the caller judges the value, the terminal needs no warning.
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    # Hoffmann et al. 2022 eq. 4: minimising L under C = k N D gives N_opt = G (C/k)^a, D_opt = G^-1 (C/k)^b,
    # G = (alpha A / (beta B))^(1/(alpha+beta)), a = beta/(alpha+beta), b = alpha/(alpha+beta).
    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def N_opt(self, C):
        return self.G * (np.asarray(C, float) / self.flops_per_token) ** self.a

    def D_opt(self, C):
        return (np.asarray(C, float) / self.flops_per_token) ** self.b / self.G

    def L_opt(self, C):
        return self(self.N_opt(C), self.D_opt(C))

    def as_dict(self, C: float | None = None) -> dict:
        out = {k: getattr(self, k) for k in ("E", "A", "B", "alpha", "beta", "a", "b", "G")}
        out.update(n_points=self.n_points, objective=self.objective, method=self.method)
        if C is not None:
            if not (self.alpha > 0 and self.beta > 0):  # G is then complex or NaN: no compute-optimal allocation
                raise ValueError(f"approach 3: fitted alpha={self.alpha:.3g}, beta={self.beta:.3g}; N_opt, D_opt need "
                                 "both > 0 (do the runs' losses vary with N and D, not with another setting such as "
                                 "the learning rate?)")
            out.update(C=float(C), N_opt=float(self.N_opt(C)), D_opt=float(self.D_opt(C)), L_opt=float(self.L_opt(C)))
        return out


# Compute-optimal allocation on a family's budget line. Small models break C = k N D with one k: a tied embedding/head
# costs ~6 V d_model FLOPs per token whatever the body's N, so across a family of tiny decoders C / (N D) falls from
# hundreds to ~10, and eq. 4's closed form (which assumes one k) misplaces the optimum. The optimum is then taken on
# D(N) = C / f(N), with f, the FLOPs per token as a function of N, read off the runs (C / D of each size).
@dataclasses.dataclass(frozen=True)
class TokenCost:
    """FLOPs per token f(N) of a model family, piecewise linear in log-log through the runs' sizes and extended
    linearly (in log-log) beyond the smallest and largest. Beyond the largest run that extension under-estimates f
    while the head's share is still falling (f's log-log slope rises towards 1): predictions far past the largest
    trained size carry that error too."""

    logN: tuple[float, ...]
    logF: tuple[float, ...]

    @classmethod
    def from_runs(cls, df: pd.DataFrame) -> "TokenCost":
        need = [c for c in ("N", "D", "C") if c not in df.columns]
        if need:
            raise ValueError(f"token cost: the run table lacks columns {need}; it needs N, D and C per run")
        f = (df["C"] / df["D"]).groupby(df["N"]).median()
        f = f[np.isfinite(f) & (f > 0) & (f.index > 0)]
        if len(f) < 2:
            raise ValueError(f"token cost: {len(f)} distinct model size(s) with finite C/D; need at least 2 to "
                             "interpolate FLOPs per token over N")
        return cls(tuple(np.log(f.index.to_numpy(float))), tuple(np.log(f.to_numpy(float))))

    def __call__(self, N):
        x, y = np.asarray(self.logN), np.asarray(self.logF)
        lx = np.log(np.asarray(N, float))
        out = np.interp(lx, x, y)
        lo_slope = (y[1] - y[0]) / (x[1] - x[0])
        hi_slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        out = np.where(lx < x[0], y[0] + lo_slope * (lx - x[0]), out)
        out = np.where(lx > x[-1], y[-1] + hi_slope * (lx - x[-1]), out)
        return np.exp(out)

    def D(self, N, C):
        return np.asarray(C, float) / self(N)

    def as_dict(self) -> dict:
        return {"N": [math.exp(v) for v in self.logN], "flops_per_token": [math.exp(v) for v in self.logF]}


def constrained_optimum(loss, C: float, cost: TokenCost, N_range: tuple[float, float]) -> tuple[float, float, float]:
    """argmin over N in N_range of loss(N, C / f(N)): a log-spaced scan, then bounded Brent around the best point.
    Raises when the minimum sits on the edge of the range (the fit has no interior optimum there)."""
    grid = np.linspace(math.log(N_range[0]), math.log(N_range[1]), 801)
    vals = np.asarray(loss(np.exp(grid), cost.D(np.exp(grid), C)), float)
    if not np.isfinite(vals).any():
        raise ValueError("constrained optimum: the loss is not finite anywhere on the budget line")
    i = int(np.nanargmin(vals))
    if i in (0, len(grid) - 1):
        raise ValueError(f"constrained optimum at C={C:.3g}: the loss keeps falling towards N={math.exp(grid[i]):.3g}, "
                         f"the edge of the searched range {N_range[0]:.3g}..{N_range[1]:.3g}; no interior optimum")
    r = optimize.minimize_scalar(lambda x: float(loss(math.exp(x), cost.D(math.exp(x), C))),
                                 bounds=(grid[i - 1], grid[i + 1]), method="bounded", options={"xatol": 1e-6})
    N = math.exp(r.x)
    D = float(cost.D(N, C))
    return N, D, float(loss(N, D))


def _huber_lse_objective(p, logN, logD, logL, delta, c_P=None):
    """Sum over points of Huber_delta(c (LSE(a - alpha log N, b - beta log D, e) - log L)), and its gradient.

    p = (a, b, e, alpha, beta) with A = e^a, B = e^b, E = e^e (Hoffmann et al. 2022 eq. 9 / appendix D.2).
    Summed, not averaged: with a mean the objective and gradient are ~1/n smaller, and L-BFGS's absolute
    tolerances then stop it early (Besiroglu et al. 2024, "Chinchilla scaling: a replication attempt").
    c_P: per-point residual scales sqrt(w / mean w), w = 1/sigma^2 (None: all 1, the paper's objective).
    """
    a, b, e, alpha, beta = p
    # Log-sum-exp written out (not scipy.special.logsumexp): this runs ~10^4 times per fit, and the softmax
    # weights it shares with the gradient come for free.
    z0_P, z1_P = a - alpha * logN, b - beta * logD
    m_P = np.maximum(np.maximum(z0_P, z1_P), e)
    e0_P, e1_P, e2_P = np.exp(z0_P - m_P), np.exp(z1_P - m_P), np.exp(e - m_P)
    s_P = e0_P + e1_P + e2_P
    r_P = m_P + np.log(s_P) - logL
    if c_P is not None:
        r_P = c_P * r_P
    absr = np.abs(r_P)
    loss = np.where(absr <= delta, 0.5 * r_P * r_P, delta * (absr - 0.5 * delta)).sum()
    w_P = np.clip(r_P, -delta, delta) / s_P  # Huber derivative times d(LSE)/dz = softmax
    if c_P is not None:
        w_P = c_P * w_P  # chain rule through the scaled residual
    g0_P, g1_P = w_P * e0_P, w_P * e1_P
    grad = np.array([g0_P.sum(), g1_P.sum(), (w_P * e2_P).sum(), -(g0_P @ logN), -(g1_P @ logD)])
    return loss, grad


def _huber_lse_batch(p_Sx5, logN, logD, logL, delta, c_P=None) -> np.ndarray:
    """The same objective for S parameter vectors at once (grid screening), shape (S,)."""
    a, b, e, alpha, beta = (p_Sx5[:, i:i + 1] for i in range(5))
    z_SxPx3 = np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, (len(p_Sx5), len(logN)))], axis=2)
    r_SxP = np.abs(special.logsumexp(z_SxPx3, axis=2) - logL)
    if c_P is not None:
        r_SxP = c_P * r_SxP
    return np.where(r_SxP <= delta, 0.5 * r_SxP ** 2, delta * (r_SxP - 0.5 * delta)).sum(axis=1)


# Hoffmann et al. 2022 appendix D.2 initialisation grid.
PAPER_GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
              "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0)}
# The grid as rows of (a, b, e, alpha, beta), the order of the parameter vector.
GRID_Sx5 = np.array([[a, b, e, al, be] for al, be, e, a, b in itertools.product(
    PAPER_GRID["alpha"], PAPER_GRID["beta"], PAPER_GRID["e"], PAPER_GRID["a"], PAPER_GRID["b"])])


def _check_ND_loss(N, D, loss, what: str):
    N = check_positive_finite(N, "N")
    D = check_positive_finite(D, "D")
    loss = check_positive_finite(loss, "loss")
    if not len(N) == len(D) == len(loss):
        raise ValueError(f"{what}: N, D and loss have lengths {len(N)}, {len(D)}, {len(loss)}; they must match")
    check_min_points(len(N), 6, what + " (5 parameters)")
    return N, D, loss


def fit_approach3(N, D, loss, *, delta: float = 1e-3, n_starts: int | None = 32,
                  init: Sequence[float] | None = None, flops_per_token: float = FLOPS_PER_TOKEN,
                  weights=None) -> Approach3Fit:
    """Hoffmann et al. 2022 appendix D.2: minimise the summed Huber (delta 1e-3) of log-loss residuals over the
    log-sum-exp parameterisation with L-BFGS from the paper's grid of initialisations, keep the best.

    `n_starts`: run L-BFGS from the `n_starts` grid points with the lowest objective (None = all 4500, as the
    paper; on the Chinchilla subset the best of 32 reaches the full grid's optimum to 1e-15 at 1/60 of the cost);
    `init` = (E, A, B, alpha, beta) adds one start (used to warm-start bootstrap refits).
    `weights`: w_i = 1/sigma_i^2 of each point's log loss (seed noise, analysis.checks.seeds). Each residual is scaled
    by sqrt(w_i / mean w) before the Huber: a standardised residual r_i / sigma_i times the constant sigma_bar =
    mean(1/sigma^2)^-1/2, so delta keeps its units (log loss at the typical noise sigma_bar), residuals inside delta
    get the inverse-variance weights w_i of least squares (Aitken 1935) and those beyond it, in the Huber's linear
    part, weights sqrt(w_i) ~ 1/sigma_i, as a Laplace likelihood would. Uniform weights are the unweighted fit exactly.
    """
    N, D, loss = _check_ND_loss(N, D, loss, "approach 3")
    if init is None and n_starts is not None and n_starts < 1:
        raise ValueError(f"n_starts={n_starts} with no init leaves nothing to start from; give n_starts >= 1 or init")
    w = relative_weights(weights, len(N), "approach 3")
    c_P = None if w is None else np.sqrt(w)
    logN, logD, logL = np.log(N), np.log(D), np.log(loss)
    grid_Sx5 = GRID_Sx5
    if n_starts == 0:
        grid_Sx5 = grid_Sx5[:0]  # warm start only (bootstrap refits): skip screening the grid
    elif n_starts is not None and n_starts < len(grid_Sx5):
        # Screen the grid by objective value (vectorised) and refine the most promising starts.
        grid_Sx5 = grid_Sx5[np.argsort(_huber_lse_batch(grid_Sx5, logN, logD, logL, delta, c_P))[:n_starts]]
    if init is not None:
        E0, A0, B0, al0, be0 = init
        grid_Sx5 = np.vstack([[np.log(A0), np.log(B0), np.log(E0), al0, be0], grid_Sx5])
    best = None
    for p0 in grid_Sx5:
        r = optimize.minimize(_huber_lse_objective, p0, args=(logN, logD, logL, delta, c_P), jac=True,
                              method="L-BFGS-B", options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-10})
        if np.all(np.isfinite(r.x)) and (best is None or r.fun < best.fun):
            best = r
    if best is None:  # e.g. a warm start from a fit whose A overflowed (the loss does not vary with N)
        raise ValueError("approach 3: no start reached finite parameters (log A, log B or log E ran off to infinity: "
                         "do the losses vary with both N and D?); analysis.laws.law fits the law within bounds instead")
    a, b, e, alpha, beta = best.x
    with np.errstate(over="ignore"):  # log A past ~709 (a resample where L barely varies with N): A = inf, kept as is
        E, A, B = np.exp(e), np.exp(a), np.exp(b)
    return Approach3Fit(E=float(E), A=float(A), B=float(B), alpha=float(alpha), beta=float(beta), n_points=len(N),
                        objective=float(best.fun), method="huber-lbfgs", flops_per_token=flops_per_token)


def _vp_inner(alpha, beta, N, D, loss, sqrt_w=None):
    """For fixed exponents the model is linear in (E, A, B) >= 0: nonnegative least squares (rows scaled by
    sqrt(w) when weighted: weighted least squares as ordinary least squares on scaled rows)."""
    X_Px3 = np.stack([np.ones_like(N), N ** -alpha, D ** -beta], axis=1)
    if sqrt_w is not None:
        X_Px3, loss = X_Px3 * sqrt_w[:, None], loss * sqrt_w
    scale = X_Px3.max(axis=0)  # column scaling for conditioning; undone below
    coef, rnorm = optimize.nnls(X_Px3 / scale, loss)
    return coef / scale, rnorm ** 2


VPNLS_BOX = (0.01, 3.0)  # the search box of VPNLS's exponents alpha, beta (analysis.checks.identify reads a fit on it)


def fit_approach3_vpnls(N, D, loss, *, flops_per_token: float = FLOPS_PER_TOKEN,
                        grid: int = 16, init: Sequence[float] | None = None, weights=None) -> Approach3Fit:
    """Variable projection (Golub & Pereyra 1973) of Hoffmann et al. 2022 eq. 2: solve (E, A, B) by nonnegative
    least squares for each (alpha, beta), and minimise the remaining squared error over (alpha, beta) from a coarse
    grid with Nelder-Mead. Squared error on loss (not Huber on log loss): fast and smooth, used for the bootstrap.
    `weights`: 1/sigma^2 of each point's loss (not log loss), multiplying its squared residual."""
    N, D, loss = _check_ND_loss(N, D, loss, "approach 3 (VPNLS)")
    w = relative_weights(weights, len(N), "approach 3 (VPNLS)")
    sqrt_w = None if w is None else np.sqrt(w)
    # Rescale N, D so N^-alpha stays well inside float range for any alpha in the search box.
    sN, sD = np.exp(np.mean(np.log(N))), np.exp(np.mean(np.log(D)))
    n, d = N / sN, D / sD

    def sse(p):
        al, be = p
        if not (VPNLS_BOX[0] <= al <= VPNLS_BOX[1] and VPNLS_BOX[0] <= be <= VPNLS_BOX[1]):
            return 1e30
        return _vp_inner(al, be, n, d, loss, sqrt_w)[1]

    if init is not None:
        starts = [np.array(init[3:5], float)]
    else:
        g = np.linspace(0.05, 1.5, grid)
        vals = [(sse((al, be)), al, be) for al in g for be in g]
        starts = [np.array(v[1:]) for v in sorted(vals)[:3]]
    best = None
    for p0 in starts:
        r = optimize.minimize(sse, p0, method="Nelder-Mead", options={"xatol": 1e-7, "fatol": 1e-14, "maxiter": 4000})
        if best is None or r.fun < best.fun:
            best = r
    al, be = best.x
    (E, An, Bd), res = _vp_inner(al, be, n, d, loss, sqrt_w)
    # Undo the rescaling: A / N^alpha = An / (N/sN)^alpha, so A = An sN^alpha.
    return Approach3Fit(E=float(E), A=float(An * sN ** al), B=float(Bd * sD ** be), alpha=float(al), beta=float(be),
                        n_points=len(N), objective=float(res), method="vpnls", flops_per_token=flops_per_token)

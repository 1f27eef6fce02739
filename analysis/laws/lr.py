"""Learning-rate sweeps: loss against peak learning rate for runs that share a shape and a budget.

The optimum is interpolated the usual way, with a parabola in log(lr) through the best grid point and its neighbours
(loss is close to quadratic in log lr near its minimum: Wortsman et al. 2023, "Small-scale proxies for large-scale
Transformer training instabilities", fig. 1 and their LR-sensitivity metric; Bi et al. 2024, DeepSeek LLM, sec. 3.1,
who sweep lr per compute budget and keep the near-optimal region). A best lr at either end of the grid has no
interior minimum: it is flagged, and the sweep should be widened on that side.

Pure pandas/numpy, no JAX. Input is the loaded run table (`analysis.load.load_sweep`), which has an `lr` column.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd


@dataclasses.dataclass(frozen=True)
class LRSweep:
    """One group of runs with the same N and the same nominal budget (D), at several learning rates."""

    N: float
    D: float
    budget: float  # planned FLOPs budget (NaN when the budget was given in tokens or steps)
    points: pd.DataFrame  # one row per lr: lr, loss (mean over usable runs, NaN if none), n_runs, n_used, status, runs
    best_lr: float | None  # lowest mean loss on the grid (None if no lr has a usable run)
    best_loss: float | None
    edge: str | None  # "lowest" / "highest" when the best lr is at that end of the grid, else None
    lr_opt: float | None  # parabola minimum in log lr (interior best only)
    loss_opt: float | None
    parabola: tuple[float, float, float] | None  # loss = c2 x^2 + c1 x + c0, x = ln lr, fitted on `window`
    window: tuple[float, float] | None  # lr range the parabola was fitted on
    excluded: pd.DataFrame  # runs of this group left out: name, lr, status, reason
    note: str

    @property
    def label(self) -> str:
        b = f"C={self.budget:.3g}" if np.isfinite(self.budget) else f"D={self.D:.3g}"
        return f"N={self.N:.3g}, {b}"

    def as_dict(self) -> dict:
        pts = self.points.copy()
        pts["loss"] = [None if not np.isfinite(v) else float(v) for v in pts["loss"]]
        return {"N": self.N, "D": self.D, "budget": self.budget if np.isfinite(self.budget) else None,
                "points": pts.to_dict("records"), "best_lr": self.best_lr, "best_loss": self.best_loss,
                "edge": self.edge, "lr_opt": self.lr_opt, "loss_opt": self.loss_opt,
                "parabola_ln_lr": list(self.parabola) if self.parabola else None,
                "window": list(self.window) if self.window else None,
                "excluded": self.excluded.to_dict("records"), "note": self.note}


def _key(v: float) -> float:
    return float(f"{v:.6g}") if np.isfinite(v) else np.nan


def _why(status: str, reason: str) -> str:
    """Short status of an excluded run: 'diverged at step 7', 'failed: RuntimeError: ...', 'missing'."""
    prefix = f"status {status}"
    if status == "missing":
        return "missing (planned, no record)"
    if reason.startswith(prefix):
        extra = reason[len(prefix):].lstrip(": ")
        return extra if extra.startswith(status) else (f"{status}: {extra}" if extra else status)
    return f"{status}: {reason}"


def fit_lr_curve(lr, loss, *, neighbours: int = 1):
    """Best lr of a grid and, when it is interior, the vertex of a least-squares parabola in ln(lr) through it and
    `neighbours` grid points on each side (1: the three-point parabola). Returns a dict: best_lr, best_loss, edge,
    lr_opt, loss_opt, parabola (c2, c1, c0), window (lr_lo, lr_hi). NaN losses (no usable run) are skipped."""
    lr, loss = np.asarray(lr, float), np.asarray(loss, float)
    order = np.argsort(lr)
    lr, loss = lr[order], loss[order]
    if np.any(~np.isfinite(lr)) or np.any(lr <= 0):
        raise ValueError("learning rates must be positive and finite")
    ok = np.isfinite(loss)
    out = {"best_lr": None, "best_loss": None, "edge": None, "lr_opt": None, "loss_opt": None, "parabola": None,
           "window": None}
    if not ok.any():
        return out
    i = int(np.nanargmin(np.where(ok, loss, np.nan)))
    out["best_lr"], out["best_loss"] = float(lr[i]), float(loss[i])
    # The grid's ends are its lowest and highest lr, usable or not: a lr whose runs all diverged still bounds the
    # grid from above, but the parabola needs usable neighbours on both sides of the best.
    left, right = np.flatnonzero(ok[:i]), np.flatnonzero(ok[i + 1:]) + i + 1
    if i == 0 or not len(left):
        out["edge"] = "lowest"
    elif i == len(lr) - 1 or not len(right):
        out["edge"] = "highest"
    if out["edge"]:
        return out
    idx = np.concatenate([left[-neighbours:], [i], right[:neighbours]])
    x, y = np.log(lr[idx]), loss[idx]
    c2, c1, c0 = np.polyfit(x, y, 2)
    out["window"] = (float(lr[idx[0]]), float(lr[idx[-1]]))
    if not c2 > 0:  # flat or concave through the best point: no minimum to interpolate
        return out
    xv = -c1 / (2 * c2)
    xv = float(np.clip(xv, x[0], x[-1]))  # a least-squares fit over >3 points may place it past the window
    out.update(lr_opt=float(np.exp(xv)), loss_opt=float(c2 * xv * xv + c1 * xv + c0),
               parabola=(float(c2), float(c1), float(c0)))
    return out


def lr_sweeps(df: pd.DataFrame, *, neighbours: int = 1) -> list[LRSweep]:
    """Groups of runs sharing N and nominal D (the same shape and budget) at 2 or more learning rates, from the loaded
    run table. Usable runs give the loss (the mean over seeds at one lr); failed, diverged and missing runs of the
    group are listed in `excluded` and their lr still counts as a grid point. Empty when the table has no lr column or
    every group has a single lr (e.g. an IsoFLOP sweep)."""
    if "lr" not in df.columns or df.empty:
        return []
    t = df.assign(_N=df["N"].map(_key), _D=df["D"].map(_key), _lr=df["lr"].map(_key))
    t = t[t["_N"].notna() & t["_D"].notna() & t["_lr"].notna() & (t["_lr"] > 0)]
    out = []
    for (N, D), g in t.groupby(["_N", "_D"], sort=True):
        if g["_lr"].nunique() < 2:
            continue
        rows = []
        for lr, gl in g.groupby("_lr", sort=True):
            used = gl[~gl["excluded"]]
            bad = gl[gl["excluded"]]
            status = "completed" if bad.empty else "; ".join(_why(r.status, r.reason) for r in bad.itertuples())
            if not bad.empty and not used.empty:
                status = f"{len(used)} completed, {len(bad)} excluded"
            rows.append({"lr": float(lr), "loss": float(used["loss"].mean()) if len(used) else np.nan,
                         "n_runs": int(len(gl)), "n_used": int(len(used)), "status": status,
                         "runs": list(gl["name"].astype(str))})
        pts = pd.DataFrame(rows)
        fit = fit_lr_curve(pts["lr"], pts["loss"], neighbours=neighbours)
        if fit["best_lr"] is not None:
            pts.loc[pts["lr"] == fit["best_lr"], "status"] = pts.loc[pts["lr"] == fit["best_lr"], "status"] + ", best"
        exc = g[g["excluded"]][["name", "lr", "status", "reason"]].reset_index(drop=True)
        if fit["best_lr"] is None:
            note = "no usable run in this group"
        elif fit["edge"] == "lowest":
            note = (f"best lr {fit['best_lr']:.3g} is the lowest usable lr on the grid: the optimum may be lower, "
                    "widen the sweep to lower learning rates")
        elif fit["edge"] == "highest":
            note = (f"best lr {fit['best_lr']:.3g} is the highest usable lr on the grid: the optimum may be higher, "
                    "widen the sweep to higher learning rates")
        elif fit["lr_opt"] is None:
            note = "best lr is interior but the loss is not convex around it: no parabola minimum"
        else:
            note = (f"parabola in ln(lr) through lr {fit['window'][0]:.3g}-{fit['window'][1]:.3g}: "
                    f"optimum lr {fit['lr_opt']:.3g}, loss {fit['loss_opt']:.4g}")
        budget = g["budget"].dropna()
        out.append(LRSweep(N=float(N), D=float(D), budget=float(budget.iloc[0]) if len(budget) else np.nan,
                           points=pts, excluded=exc, note=note, **fit))
    return out

"""Downstream figures (analysis.laws.downstream), in analysis.report.plots' style: the emergence view and accuracy
against loss."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from analysis.laws.downstream import AccuracyFit, task_points
from analysis.report.plots import STYLE, _log_x_ticks, _save, plt


def _grid(n: int, ncols: int, size=(4.2, 3.2)):
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes


def _D_colors(pts: pd.DataFrame):
    """Colour by tokens per parameter D/N (log), so runs of one size trained longer read as one family of points."""
    r = np.log10(pts["D"] / pts["N"])
    return matplotlib.colors.Normalize(r.min(), r.max() if np.ptp(r) > 0 else r.min() + 1), r


def plot_emergence(df: pd.DataFrame, tasks: list[str], out_dir: Path, metric: str = "acc") -> list[Path]:
    """Per task: accuracy vs N with the chance level (left) and, beside it, the continuous metric, the mean
    log-likelihood of the correct answer (right): Schaeffer et al. 2023 show that a discontinuous metric (accuracy)
    can make a smooth gain look like sudden emergence, which the continuous one then reveals."""
    with plt.rc_context(STYLE):
        fig, axes = _grid(2 * len(tasks), 2)
        cmap = plt.get_cmap("viridis")
        for row, task in zip(axes, tasks):
            pts = task_points(df, task, metric)
            norm, ratio = _D_colors(pts)
            chance = pts["chance"].dropna()
            for ax, col, label in ((row[0], "acc", f"{metric} [%]"),
                                   (row[1], "logprob", "log-likelihood of the correct answer [nats]")):
                y = 100 * pts[col] if col == "acc" else pts[col]
                ax.scatter(pts["N"], y, c=ratio, cmap=cmap, norm=norm, s=22, edgecolors="k", lw=0.4, zorder=3)
                mean = y.groupby(pts["N"]).mean()
                ax.plot(mean.index, mean.to_numpy(), color="0.5", lw=1, zorder=2, label="mean over D")
                if col == "acc" and len(chance):
                    ax.axhline(100 * chance.iloc[0], ls="--", color="tab:red", lw=1, label="chance")
                ax.set(xscale="log", xlabel="N (parameters)", ylabel=label, title=f"{task}: {col}")
                _log_x_ticks(ax, pts["N"])
                ax.legend(fontsize=8)
            fig.colorbar(matplotlib.cm.ScalarMappable(norm, cmap), ax=row[1], label=r"$\log_{10}(D/N)$")
        fig.tight_layout()
        return _save(fig, out_dir, "emergence")


def plot_accuracy_vs_loss(df: pd.DataFrame, results: list[dict], out_dir: Path) -> list[Path]:
    """Per fitted task: accuracy against the step-2 loss with the fitted sigmoid, its chance floor, the prediction at
    the queried C (with its interval) and the backtest's held-out runs (observed, and predicted from the smaller
    runs)."""
    fitted = [r for r in results if "error" not in r]
    if not fitted:
        return []
    with plt.rc_context(STYLE):
        fig, axes = _grid(len(fitted), min(len(fitted), 3))
        for ax, r in zip(axes.ravel(), fitted):
            pts = task_points(df, r["task"], r["metric"])
            f = AccuracyFit(**{k: r["accuracy_fit"][k] for k in ("floor", "ceiling", "k", "L0", "n_points", "rmse",
                                                                "ceiling_fixed")})
            x, p = pts[r["x"]], r["prediction"]
            lo, hi = min(x.min(), p["L"]), max(x.max(), p["L"])
            L = np.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 200)
            ax.scatter(x, 100 * pts["acc"], s=20, color="tab:blue", edgecolors="k", lw=0.4, zorder=3, label="runs")
            ax.plot(L, 100 * f(L), color="k", lw=1.2, label="sigmoid fit")
            ax.axhline(100 * f.floor, ls="--", color="tab:red", lw=1, label="chance (floor)")
            ci = p["acc_ci95"]
            err = None if not ci else [[100 * (p["acc"] - ci[0])], [100 * (ci[1] - p["acc"])]]
            ax.errorbar([p["L"]], [100 * p["acc"]], yerr=err, fmt="*", color="tab:orange", ms=10, capsize=3, zorder=4,
                        label=f"predicted at C={p['C']:.2g}")
            bt = r.get("backtest") or {}
            for i, h in enumerate(bt.get("runs", [])):
                ax.plot([h["L_predicted"]], [100 * h["acc_predicted"]], "s", mfc="none", color="tab:green", zorder=4,
                        label="backtest: predicted" if i == 0 else None)
                ax.plot([h["L_observed"]], [100 * h["acc_observed"]], "s", color="tab:green", ms=4, zorder=4,
                        label="backtest: held out" if i == 0 else None)
            xlabel = "validation loss [nats/token]" if r["x"] == "loss" else "task loss [nats]"
            ax.set(xlabel=xlabel, ylabel=f"{r['metric']} [%]", title=r["task"])
            ax.legend(fontsize=7)
        for ax in axes.ravel()[len(fitted):]:
            ax.set_visible(False)
        fig.tight_layout()
        return _save(fig, out_dir, "accuracy_vs_loss")

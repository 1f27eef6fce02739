"""Publication-quality figures (matplotlib, Agg): each function draws one figure and saves it as PNG and SVG."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display: works on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.laws.approach3 import Approach3Fit  # noqa: E402
from analysis.laws.fits import Approach2Fit, KaplanFit, PowerLaw, isoflop_key, lower_envelope  # noqa: E402
from analysis.load import TARGETS  # noqa: E402

STYLE = {"figure.dpi": 110, "savefig.dpi": 200, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False}

# Reference lines (exponents only, through the fitted line's middle point): Kaplan et al. 2020 eq. 6.1 N_opt ~ C^0.73
# and Hoffmann et al. 2022 table 2 (approach 2) N_opt ~ C^0.49, D_opt ~ C^0.51.
REFERENCE_A = {"Kaplan 2020 (a=0.73)": 0.73, "Chinchilla 2022 (a=0.49)": 0.49}
REFERENCE_B = {"Kaplan 2020 (b=0.27)": 0.27, "Chinchilla 2022 (b=0.51)": 0.51}


def _unit(df: pd.DataFrame) -> str:
    """The fitted loss's unit: nats/token, or bits per byte / character under --target (analysis.load.select_target)."""
    return TARGETS[str(df["target"].iloc[0])] if "target" in df and len(df) else TARGETS["loss"]


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    for p in paths:
        tmp = p.with_name(f".{p.stem}.tmp{p.suffix}")  # keep the suffix: matplotlib picks the format from it
        fig.savefig(tmp, bbox_inches="tight")
        tmp.replace(p)
    plt.close(fig)
    return paths


def _budget_colors(budgets) -> dict:
    budgets = sorted(set(budgets))
    cmap = plt.get_cmap("viridis")
    return {b: cmap(i / max(len(budgets) - 1, 1) * 0.9) for i, b in enumerate(budgets)}


def _plain_log_y(ax) -> None:
    """Log y axis with plain tick labels (losses span < 1 decade, where 4x10^0 labels read badly)."""
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))


def _sci_label(x, _pos=None) -> str:
    if not x > 0:
        return ""
    e = int(np.floor(np.log10(x) + 1e-9))
    m = x / 10 ** e
    return rf"$10^{{{e}}}$" if abs(m - 1) < 1e-6 else rf"${m:.0f}\times10^{{{e}}}$"


def _log_x_ticks(ax, values) -> None:
    """Labelled log x ticks that never collide: over less than ~2 decades matplotlib labels the minor ticks too
    (2x10^6, 3x10^6, 4x10^6, ... run into each other), so label 1-3(-2-5) steps instead and leave the minors bare."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return
    span = np.log10(v.max() / v.min())
    if span >= 2.2:
        subs = (1.0,)
    elif span >= 1.0:
        subs = (1.0, 3.0)
    else:
        subs = (1.0, 2.0, 5.0)
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_sci_label))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _seed_errorbars(ax, spread: pd.DataFrame | None, x: str, color=None, label: str | None = None) -> None:
    """+-1 sigma over seeds around each replicated point's mean loss (analysis.seeds.replicate_points rows)."""
    if spread is None or spread.empty:
        return
    ax.errorbar(spread[x], spread["loss"], yerr=spread["sigma"], fmt="_", ms=7, color=color or "k", ecolor=color or "k",
                elinewidth=1, capsize=2.5, zorder=4, label=label)


def plot_loss_vs_compute(df: pd.DataFrame, out_dir: Path, kaplan_C: KaplanFit | None = None,
                         curves: pd.DataFrame | None = None, spread: pd.DataFrame | None = None) -> list[Path]:
    """Final losses (or whole training curves) against C, the compute-efficient frontier and the fitted L(C_min)
    (Kaplan et al. 2020 fig. 1). With curves, the frontier is their lower envelope, else that of final losses.
    `spread`: seed-replicated points (mean loss, sigma), drawn as mean +- sigma."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        norm = matplotlib.colors.Normalize(np.log10(df["N"].min()), np.log10(df["N"].max()))
        cmap = plt.get_cmap("viridis")
        if curves is not None:
            for i, (_, g) in enumerate(curves.groupby("run")):
                ax.plot(g["C"], g["loss"], color=cmap(norm(np.log10(g["N"].iloc[0]))), lw=0.7, alpha=0.6,
                        label="training curves (train loss)" if i == 0 else None)
            fx, fy = lower_envelope(curves["C"], curves["loss"])
        else:
            fx, fy = lower_envelope(df["C"], df["loss"])
        # The dots are the final (validation) losses the fits use: with curves of train loss they need not sit on the
        # curves' ends, so the legend names both.
        ax.scatter(df["C"], df["loss"], c=np.log10(df["N"]), cmap=cmap, norm=norm, s=18, alpha=0.9, lw=0.4, zorder=3,
                   edgecolors="k", label="final loss (fitted)")
        fig.colorbar(matplotlib.cm.ScalarMappable(norm, cmap), ax=ax, label=r"$\log_{10} N$")
        _seed_errorbars(ax, spread, "C", label=r"mean $\pm\sigma$ over seeds")
        ax.plot(fx, fy, color="k", lw=1.2, label="frontier (lower envelope)")
        if kaplan_C is not None:
            c = np.geomspace(fx.min(), fx.max(), 100)
            ax.plot(c, kaplan_C(c), "--", color="tab:red",
                    label=rf"$L=(C_c/C)^{{{kaplan_C.alpha:.3f}}}$" + (f" + {kaplan_C.E:.2f}" if kaplan_C.E else ""))
        ax.set(xscale="log", yscale="log", xlabel="training compute C [FLOPs]", ylabel=f"loss [{_unit(df)}]",
               title="Loss vs compute")
        _plain_log_y(ax)
        ax.legend(fontsize=8)
        return _save(fig, out_dir, "loss_vs_compute")


def plot_isoflops(df: pd.DataFrame, a2: Approach2Fit, out_dir: Path, spread: pd.DataFrame | None = None,
                  flagged: pd.DataFrame | None = None, budget_flags: dict | None = None) -> list[Path]:
    """IsoFLOP curves: loss vs N per budget, fitted parabolas in log N and their minima (Hoffmann fig. 3 left).
    `spread`: seed-replicated points (mean loss, sigma), drawn as mean +- sigma in their budget's colour.
    `flagged`: runs analysis.checks.quality flagged (N, loss, flags), ringed in red and lettered (o outlier,
    d duplicate);
    `budget_flags`: {budget: "off_centre;weak_curvature"}, named in that budget's legend entry."""
    key = isoflop_key(df)
    colors = _budget_colors(df[key])
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        fitted = set(a2.minima["budget"])
        for C, g in df.groupby(key):
            # A budget Approach 2 left out (minimum not bracketed) keeps its points, open, and says why in the legend.
            left_out = C not in fitted
            ax.scatter(g["N"], g["loss"], color=colors[C], s=16, zorder=3, facecolors="none" if left_out else None,
                       label=f"C={C:.1e} (not fitted)" if left_out else None)
        for row in a2.minima.itertuples():
            g = df[df[key] == row.budget]
            if row.parabola_N is not None:
                x = np.linspace(np.log(g["N"].min()), np.log(g["N"].max()), 100)
                why = (budget_flags or {}).get(row.budget, "").replace("_", " ").replace(";", ", ")
                ax.plot(np.exp(x), row.parabola_N(x), color=colors[row.budget], lw=1.2,
                        label=f"C={row.budget:.1e}" + (f" ({why})" if why else ""))
            ax.plot(row.N_opt, row.loss_opt, marker="*", color="k", ms=9, zorder=4)
        ax.plot([], [], "k*", label="minimum")
        if spread is not None and not spread.empty:
            for b, g in spread.groupby("budget" if key == "budget" else "C"):
                _seed_errorbars(ax, g, "N", colors.get(b, "k"))
            ax.errorbar([], [], yerr=[], fmt="_", color="k", capsize=2.5, label=r"mean $\pm\sigma$ over seeds")
        if flagged is not None and not flagged.empty:
            ax.scatter(flagged["N"], flagged["loss"], s=90, facecolors="none", edgecolors="tab:red", lw=1.4, zorder=5,
                       label="QC flag (o: spline outlier, d: near-duplicate N)")
            for f in flagged.itertuples():
                tag = "".join(t for t, name in (("o", "spline_outlier"), ("d", "near_duplicate")) if name in f.flags)
                ax.annotate(tag, (f.N, f.loss), textcoords="offset points", xytext=(5, 4), fontsize=7,
                            color="tab:red")
        ax.set(xscale="log", xlabel="parameters N", ylabel=f"final loss [{_unit(df)}]", title="IsoFLOP curves")
        _log_x_ticks(ax, df["N"])
        ax.legend(fontsize=7, ncol=2)
        return _save(fig, out_dir, "isoflops")


def _band(ax, C, samples: pd.DataFrame | None, coef: str, expo: str, color):
    if samples is None or coef not in samples or expo not in samples:
        return
    curves = samples[coef].to_numpy()[:, None] * C[None, :] ** samples[expo].to_numpy()[:, None]
    lo, hi = np.nanpercentile(curves, [2.5, 97.5], axis=0)
    ax.fill_between(C, lo, hi, color=color, alpha=0.2, lw=0, label="95% bootstrap band")


def plot_optimal_allocation(minima: pd.DataFrame, N_opt: PowerLaw, D_opt: PowerLaw, out_dir: Path,
                            samples: pd.DataFrame | None = None, extend_to: float | None = None,
                            xlabel: str | None = None) -> list[Path]:
    """N_opt(C) and D_opt(C): per-budget minima, the fitted power law with its bootstrap band, and the Kaplan and
    Chinchilla exponents for reference (Hoffmann et al. 2022 fig. 3, centre and right). `xlabel` names C when it is
    not plain training compute (e.g. the planned budgets in their own FLOP convention)."""
    C = np.geomspace(minima["C"].min(), max(minima["C"].max(), extend_to or 0), 100)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, law, col, sym, coef, refs in ((axes[0], N_opt, "N_opt", "N", "k_N", REFERENCE_A),
                                              (axes[1], D_opt, "D_opt", "D", "k_D", REFERENCE_B)):
            ax.scatter(minima["C"], minima[col], color="k", s=20, zorder=3, label="IsoFLOP minima")
            ax.plot(C, law(C), color="tab:blue", label=rf"fit ${sym}_{{opt}}\propto C^{{{law.a:.3f}}}$")
            _band(ax, C, samples, coef, "a" if sym == "N" else "b", "tab:blue")
            mid = np.sqrt(C[0] * C[-1])
            for (label, expo), style in zip(refs.items(), (":", "--")):
                ax.plot(C, law(mid) * (C / mid) ** expo, style, color="0.45", lw=1, label=label)
            ax.set(xscale="log", yscale="log", xlabel=xlabel or "compute C [FLOPs]", ylabel=rf"${sym}_{{opt}}$",
                   title=rf"Compute-optimal ${sym}$")
            _log_x_ticks(ax, C)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return _save(fig, out_dir, "optimal_allocation")


def plot_residuals(df: pd.DataFrame, a3: Approach3Fit, out_dir: Path) -> list[Path]:
    """log(observed) - log(predicted) of Approach 3 against N and against D."""
    r = np.log(df["loss"]) - np.log(a3(df["N"], df["D"]))
    key = isoflop_key(df)
    colors = _budget_colors(df[key])
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
        for ax, col in zip(axes, ("N", "D")):
            for b, g in df.groupby(key):
                ax.scatter(g[col], r[g.index], color=colors[b], s=14, label=f"C={b:.1e}")
            ax.axhline(0, color="k", lw=0.8)
            ax.set(xscale="log", xlabel=col, title=f"Approach 3 residuals vs {col}")
            _log_x_ticks(ax, df[col])
        axes[0].set_ylabel("log L observed - log L fitted")
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        return _save(fig, out_dir, "residuals")


def plot_contours(df: pd.DataFrame, a3: Approach3Fit, out_dir: Path) -> list[Path]:
    """Contours of the fitted L(N, D), the runs, IsoFLOP lines and the compute-optimal path (Hoffmann fig. 4)."""
    n = np.geomspace(df["N"].min() / 3, df["N"].max() * 3, 200)
    d = np.geomspace(df["D"].min() / 3, df["D"].max() * 3, 200)
    NN, DD = np.meshgrid(n, d)
    with plt.rc_context(STYLE | {"axes.grid": False}):
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        cs = ax.contourf(NN, DD, a3(NN, DD), levels=20, cmap="viridis_r")
        fig.colorbar(cs, ax=ax, label="fitted loss L(N, D)")
        k = a3.flops_per_token
        # Lines of constant C in the table's convention; a sweep planned in another convention (chinchilla, say) has
        # its runs of one budget off these lines, so the label names the convention.
        conv = str(df["C_convention"].iloc[0]) if "C_convention" in df and len(df) else ""
        iso_label = f"IsoFLOP lines (C = {k:.3g}ND)" if conv == "6ND" else f"IsoFLOP lines ({conv or 'C'})"
        for i, C in enumerate(np.geomspace(df["C"].min(), df["C"].max(), 4)):
            ax.plot(n, C / (k * n), color="w", lw=0.6, alpha=0.7, label=iso_label if i == 0 else None)
        C = np.geomspace(k * n[0] * d[0], k * n[-1] * d[-1], 200)
        ax.plot(a3.N_opt(C), a3.D_opt(C), color="tab:red", lw=2, label=rf"compute-optimal ($a$={a3.a:.2f})")
        ax.scatter(df["N"], df["D"], s=8, color="k", label="runs")
        ax.set(xscale="log", yscale="log", xlim=(n[0], n[-1]), ylim=(d[0], d[-1]), xlabel="parameters N",
               ylabel="tokens D", title="Approach 3: L(N, D)")
        ax.legend(fontsize=8, loc="lower right")
        return _save(fig, out_dir, "contours")


def _short(x: float) -> str:
    """2.5e4 rather than 2.55e+04, for legends."""
    m, e = f"{x:.2g}".partition("e")[::2]
    return f"{m}e{int(e)}" if e else m


def plot_lr_sweeps(sweeps, out_dir: Path) -> list[Path]:
    """Loss vs peak learning rate (log x), one curve per group of runs with the same N and budget (`analysis.laws.lr`):
    the grid points, the parabola in ln(lr) over its window, the interpolated optimum (star), a best lr at the edge
    of the grid (open circle), and the lrs with no usable run (x at the top of the axes)."""
    cmap = plt.get_cmap("tab10")
    colors = [cmap(i % 10) for i in range(len(sweeps))]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        top = matplotlib.transforms.blended_transform_factory(ax.transData, ax.transAxes)
        all_lr = []
        for i, s in enumerate(sweeps):
            col = colors[i]
            p = s.points
            all_lr += list(p["lr"])
            ok = np.isfinite(p["loss"].to_numpy(float))
            budget = f"C={_short(s.budget)}" if np.isfinite(s.budget) else f"D={_short(s.D)}"
            ax.plot(p["lr"][ok], p["loss"][ok], "o-", color=col, ms=5, lw=1, alpha=0.9, zorder=3,
                    label=f"N={_short(s.N)}, {budget}" + (f": lr*={_short(s.lr_opt)}" if s.lr_opt else ""))
            if (~ok).any():
                ax.plot(p["lr"][~ok], np.full((~ok).sum(), 0.97), "x", color=col, ms=7, mew=1.5, transform=top,
                        clip_on=False, zorder=4)
            if s.parabola is not None:
                x = np.linspace(np.log(s.window[0]), np.log(s.window[1]), 100)
                ax.plot(np.exp(x), np.polyval(s.parabola, x), "--", color=col, lw=1, alpha=0.8)
                ax.plot(s.lr_opt, s.loss_opt, "*", color=col, mec="k", mew=0.6, ms=13, zorder=5)
            elif s.edge and s.best_lr is not None:
                ax.plot(s.best_lr, s.best_loss, "o", mfc="none", mec="tab:red", ms=12, mew=1.5, zorder=5)
        if any(s.parabola is not None for s in sweeps):
            ax.plot([], [], "k--", lw=1, label=r"parabola in $\ln(\mathrm{lr})$")
            ax.plot([], [], "*", color="0.6", mec="k", mew=0.6, ms=11, label="interpolated optimum")
        if any(s.edge and s.parabola is None and s.best_lr is not None for s in sweeps):
            ax.plot([], [], "o", mfc="none", mec="tab:red", ms=9, mew=1.5, label="best at grid edge: widen sweep")
        if any(not np.isfinite(s.points["loss"].to_numpy(float)).all() for s in sweeps):
            ax.plot([], [], "x", color="0.3", ms=7, mew=1.5, label="no usable run (diverged/failed)")
        ax.set(xscale="log", xlabel="peak learning rate", ylabel="final loss [nats/token]",
               title="Learning-rate sweeps")
        lo, hi = min(all_lr), max(all_lr)
        ax.set_xlim(lo / (hi / lo) ** 0.08, hi * (hi / lo) ** 0.08)
        _log_x_ticks(ax, all_lr)
        ax.legend(fontsize=7)
        return _save(fig, out_dir, "lr_sweep")


def plot_verification(v: dict, out_dir: Path) -> list[Path]:
    """Predict, then verify: the runs trained at the predicted budget (loss vs N) against the committed N_opt and L_opt
    with their 95% intervals (analysis.predict.verify's result)."""
    runs = pd.DataFrame(v["runs"])
    p = v["predicted"]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.axhspan(*p["L_opt_ci95"], color="tab:orange", alpha=0.15, lw=0, label="predicted L_opt, 95% interval")
        ax.axhline(p["L_opt"], color="tab:orange", lw=1.5)
        if p.get("N_opt_ci95"):
            ax.axvspan(*p["N_opt_ci95"], color="tab:blue", alpha=0.1, lw=0, label="predicted N_opt, 95% interval")
        ax.axvline(p["N_opt"], color="tab:blue", lw=1.5, ls="--")
        ax.plot(runs["N"], runs["loss"], "ko-", ms=6, zorder=3, label="trained after the prediction")
        b = v["best"]
        ax.annotate(f"{v['rel_error_L_opt']:+.2%}", (b["N"], b["loss"]), textcoords="offset points", xytext=(6, -14),
                    fontsize=9)
        ax.set(xscale="log", xlabel="parameters N", ylabel="final loss [nats/token]",
               title=f"Prediction vs runs at C = {v['C']:.2g}")
        _log_x_ticks(ax, list(runs["N"]) + list(p.get("N_opt_ci95") or []))
        ax.legend(fontsize=7)
        return _save(fig, out_dir, "verification")

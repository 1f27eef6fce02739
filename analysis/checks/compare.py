"""Compare sweeps (datasets, tokenizers, architectures): their fits side by side and the effective compute multiplier.

The multiplier of sweep B over sweep A at a loss L is C_A(L) / C_B(L): how many times the compute A needs to reach L
does B need once (2 = B reaches A's loss with half the compute). Each C_X(L) inverts the sweep's compute frontier
L(C) = (C_c / C)^alpha_C (Kaplan et al. 2020 eq. 1.3, fitted in log space to the best run of each budget), so
C(L) = C_c L^(-1/alpha_C); L defaults to the middle (in log) of the loss range every frontier covers, where the
inversion interpolates. Its interval: each sweep's runs are resampled independently (within budgets, as Approach 2's
bootstrap does), the frontiers refitted, and the ratio taken draw by draw (percentile bootstrap; two independent
samples, Efron & Tibshirani 1993 sec. 8.3).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.checks.identify import describe
from analysis.checks.uncertainty import bootstrap
from analysis.laws.fits import fit_kaplan, isoflop_key, isoflop_minimum, lower_envelope
from analysis.load import load_runs_csv, load_sweep, usable
from analysis.report.build import fit_all
from analysis.report.plots import STYLE, _plain_log_y, _save
from scaling.record import clean_json

LEVEL = 0.95


def frontier_points(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(C, loss) of the compute frontier: per budget (else per C) the minimum of its IsoFLOP parabola (Hoffmann et al.
    2022 sec. 3.2), or its best run where the parabola has no bracketed minimum; then their lower envelope. The
    parabola, not the best run: a minimum over runs is biased upwards in every bootstrap draw that misses the best
    run, which would push the whole interval to one side of the estimate."""
    C, loss = [], []
    for budget, g in df.groupby(isoflop_key(df), sort=True):
        try:
            m = isoflop_minimum(g, float(budget))
            C.append(m["C"]), loss.append(m["loss_opt"])
        except ValueError:
            best = g.loc[g["loss"].idxmin()]
            C.append(float(best["C"])), loss.append(float(best["loss"]))
    return lower_envelope(np.asarray(C, float), np.asarray(loss, float))


@dataclasses.dataclass(frozen=True)
class FrontierStat:
    """alpha_C, C_c of L(C) = (C_c / C)^alpha_C on the frontier and, at loss L, C(L) = C_c L^(-1/alpha_C)."""

    L: float | None = None

    def __call__(self, df: pd.DataFrame) -> dict:
        C, loss = frontier_points(df)
        f = fit_kaplan(C, loss, variable="C")
        out = {"alpha_C": f.alpha, "C_c": f.X_c}
        if self.L is not None:
            out["C_at_L"] = float(math.exp(math.log(f.X_c) - math.log(self.L) / f.alpha))
        return out


def _load(source: Path, n: str, c: str | None) -> pd.DataFrame:
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"compare: {source} does not exist; give sweep directories or their runs.csv files")
    return load_runs_csv(source, n=n, c=c) if source.is_file() else load_sweep(source, n=n, c=c)


def _interval(samples: np.ndarray) -> list[float] | None:
    s = samples[np.isfinite(samples)]
    if len(s) < 2:
        return None
    q = (1 - LEVEL) / 2
    return [float(np.quantile(s, q)), float(np.quantile(s, 1 - q))]


def compare_sweeps(tables: dict[str, pd.DataFrame], *, at_loss: float | None = None, C: float | None = None,
                   n_bootstrap: int = 200, seed: int = 0, n_jobs: int = 2, approaches=(2, 3)) -> tuple[dict, dict]:
    """Fit every sweep (analysis.report.fit_all, at one common C) and its compute frontier; the multiplier of each
    sweep over the first at `at_loss` (default: the middle of the common frontier loss range). Returns (results for
    JSON, {name: (runs, frontier fit)} for the figure)."""
    if len(tables) < 2:
        raise ValueError(f"compare: {len(tables)} sweep(s) given; give at least 2 to compare")
    if at_loss is not None and not (math.isfinite(at_loss) and at_loss > 0):
        raise ValueError(f"compare: at_loss={at_loss}; give a positive loss in the sweeps' units, e.g. 2.5")
    runs = {}
    for name, df in tables.items():
        r = usable(df)
        if r.empty:
            raise ValueError(f"compare: sweep {name!r} has no usable runs (all excluded); finish it or leave it out")
        runs[name] = r
    conv = {name: str(r["C_convention"].iloc[0]) for name, r in runs.items()}
    if len(set(conv.values())) > 1:
        raise ValueError(f"compare: the sweeps count C in different FLOP conventions {conv}; their compute is not "
                         "comparable: load them in one with --c-convention (e.g. 6N)")
    if C is None:  # one C for every sweep's N_opt: a decade beyond the largest run of any sweep
        C = 10 * max(float(r["C"].max()) for r in runs.values())
    est = {name: FrontierStat()(r) for name, r in runs.items()}
    ranges = {name: (float(frontier_points(r)[1].min()), float(frontier_points(r)[1].max())) for name, r in runs.items()}
    lo, hi = max(v[0] for v in ranges.values()), min(v[1] for v in ranges.values())
    if at_loss is None:
        if not lo < hi:
            raise ValueError("compare: the sweeps' frontier losses do not overlap ("
                             + ", ".join(f"{n}: {a:.4g}-{b:.4g}" for n, (a, b) in ranges.items())
                             + "), so no loss is reached by all of them; give --at-loss to extrapolate")
        at_loss = float(math.exp((math.log(lo) + math.log(hi)) / 2))
    stat = FrontierStat(at_loss)
    frontiers, C_at_L = {}, {}
    for i, (name, r) in enumerate(runs.items()):
        d = stat(r)
        if n_bootstrap > 0:
            b = bootstrap(r, stat, n_resamples=n_bootstrap, seed=seed + i, n_jobs=n_jobs, strata=isoflop_key(r),
                          level=LEVEL)
            d |= {"ci95": b.ci, "n_resamples": len(b.samples), "n_failed": b.n_failed}
            C_at_L[name] = b.samples["C_at_L"].to_numpy(float)
        frontiers[name] = d | {"loss_range": list(ranges[name]), "n_points": len(frontier_points(r)[0])}
    first = next(iter(runs))
    multipliers = {}
    for name in list(runs)[1:]:
        m = {"estimate": frontiers[first]["C_at_L"] / frontiers[name]["C_at_L"]}
        if n_bootstrap > 0:
            k = min(len(C_at_L[first]), len(C_at_L[name]))  # independent resamples: pair them draw by draw
            m["ci95"] = _interval(C_at_L[first][:k] / C_at_L[name][:k])
            m["n"] = k
        multipliers[name] = m
    fits = {name: {} for name in runs}
    for name, r in runs.items() if approaches else ():  # approaches=(): the multiplier alone
        res, _ = fit_all(r, approaches=approaches, C=C, n_bootstrap=n_bootstrap, seed=seed, n_jobs=n_jobs)
        fits[name] = {k: res[k] for k in ("approach2", "approach3") if k in res}
    out = {"sweeps": list(runs), "reference": first, "C_convention": conv[first], "C_query": C, "at_loss": at_loss,
           "common_loss_range": [lo, hi], "frontiers": frontiers, "multipliers": multipliers, "fits": fits,
           "n_runs": {name: len(r) for name, r in runs.items()}}
    return clean_json(out), {name: (runs[name], est[name]) for name in runs}


# ---------------------------------------------------------------------------------------------------------------------
# Report: one table, one figure
# ---------------------------------------------------------------------------------------------------------------------
HEADLINE = [("frontier", "alpha_C"), ("frontier", "C_at_L"), ("approach2", "a"), ("approach2", "N_opt"),
            ("approach3", "E"), ("approach3", "alpha"), ("approach3", "beta"), ("approach3", "a"),
            ("approach3", "N_opt"), ("approach3", "L_opt")]


def _cell(d: dict | None, key: str) -> str:
    if not d or "error" in d:
        return "not fitted" if d and "error" in d else "-"
    if key not in d:
        return "-"
    note = describe(key, d.get("identification"))
    if note and note.startswith("not identified"):
        return note
    ci = (d.get("ci95") or {}).get(key)
    s = f"{d[key]:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")
    return s + (f" ({note})" if note else "")


def compare_markdown(res: dict, figures: list[str]) -> str:
    names = res["sweeps"]
    L = [f"# Sweep comparison: {', '.join(names)}", "",
         f"C in the {res['C_convention']} convention; N_opt, L_opt at C = {res['C_query']:.3g} FLOPs; intervals: 95% "
         "percentile bootstrap over each sweep's runs. Losses compare only between sweeps with the same data and "
         "tokenizer (per-token loss); across tokenizers compare bits per byte.", "",
         "| quantity | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for where, key in HEADLINE:
        label = {"frontier": "frontier L(C)", "approach2": "Approach 2", "approach3": "Approach 3"}[where]
        sym = f"C(L={res['at_loss']:.4g})" if key == "C_at_L" else key
        cells = [_cell(res["frontiers"][n] if where == "frontier" else res["fits"][n].get(where), key) for n in names]
        if set(cells) == {"-"}:  # an approach not asked for (--approach)
            continue
        L.append(f"| {label}: {sym} | " + " | ".join(cells) + " |")
    m = res["multipliers"]
    L.append("| compute multiplier over " + res["reference"] + " | 1 | " + " | ".join(
        f"{m[n]['estimate']:.3g}" + (f" [{m[n]['ci95'][0]:.3g}, {m[n]['ci95'][1]:.3g}]" if m[n].get("ci95") else "")
        for n in names[1:]) + " |")
    lo, hi = res["common_loss_range"]
    L += ["", f"Compute multiplier of a sweep over {res['reference']} at loss {res['at_loss']:.4g}: "
          f"C_{res['reference']}(L) / C_sweep(L) from the fitted frontiers L(C) = (C_c / C)^alpha_C (Kaplan et al. "
          "2020 eq. 1.3): above 1, the sweep reaches that loss with less compute. Frontier loss range every sweep "
          + (f"covers: {lo:.4g} to {hi:.4g}." if lo < hi else "covers: none (the loss was given, so the multiplier "
             "extrapolates at least one frontier)."), ""]
    L += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(L) + "\n"


def plot_compare(data: dict, res: dict, out_dir: Path) -> list[Path]:
    """Loss vs C of every sweep (runs faint, frontier points solid) with its fitted frontier, and the loss at which the
    multipliers are read."""
    colors = plt.get_cmap("tab10")
    L = res["at_loss"]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for i, (name, (runs, f)) in enumerate(data.items()):
            col = colors(i % 10)
            ax.scatter(runs["C"], runs["loss"], s=10, color=col, alpha=0.3, lw=0)
            fx, fy = frontier_points(runs)
            ax.scatter(fx, fy, s=24, color=col, edgecolors="k", lw=0.4, zorder=3)
            C_L = res["frontiers"][name]["C_at_L"]
            c = np.geomspace(min(fx.min(), C_L), max(fx.max(), C_L), 100)
            m = res["multipliers"].get(name)
            ax.plot(c, (f["C_c"] / c) ** f["alpha_C"], color=col, lw=1.4,
                    label=rf"{name}: $L=(C_c/C)^{{{f['alpha_C']:.3f}}}$"
                    + (f", x{m['estimate']:.3g} compute" if m else " (reference)"))
            ax.plot([C_L], [L], marker="|", ms=14, mew=2, color=col, zorder=4)
        ax.axhline(L, color="0.4", lw=0.8, ls="--", label=f"L = {L:.4g} (multipliers read here)")
        ax.set(xscale="log", yscale="log", xlabel="training compute C [FLOPs]", ylabel="final loss",
               title="Sweeps compared: loss vs compute")
        _plain_log_y(ax)
        ax.legend(fontsize=7)
        return _save(fig, out_dir, "compare_loss_vs_compute")


def write_comparison(sources: list[str | Path], out_dir: str | Path, *, names: list[str] | None = None,
                     n: str = "non_embedding", c: str | None = None, **kw) -> Path:
    """Load each sweep (a directory or its runs.csv), compare them, and write compare.md, compare.json and
    figures/ into `out_dir`. Returns the Markdown path."""
    from scaling.record import write_json_atomic, write_text_atomic

    names = names or [Path(s).parent.name if Path(s).is_file() else Path(s).name for s in sources]
    if len(names) != len(sources):
        raise ValueError(f"compare: {len(names)} names for {len(sources)} sweeps; give one name per sweep")
    if len(set(names)) != len(names):
        raise ValueError(f"compare: sweep names {names} repeat; give distinct ones with --names a,b")
    tables = {name: _load(Path(s), n, c) for name, s in zip(names, sources)}
    res, data = compare_sweeps(tables, **kw)
    out = Path(out_dir)
    figs = [p for p in plot_compare(data, res, out / "figures") if p.suffix == ".png"]
    write_json_atomic(out / "compare.json", res, indent=1)
    md = out / "compare.md"
    write_text_atomic(md, compare_markdown(res, [str(p.relative_to(out)) for p in figs]))
    return md

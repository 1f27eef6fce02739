"""Run every fit on a run table (with bootstrap intervals), and write the Markdown report and figures.

One C for everything: the table's C (the records' own convention unless another was asked, analysis.load) is what
Kaplan's L(C) and Approaches 1, 2 and 3 fit against, and all of them are queried at the same C.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.checks.identify import describe, mark_identification
from analysis.checks.quality import isoflop_quality, quality_markdown
from analysis.checks.seeds import POINT, W_LOG, W_LOSS, point_means, seed_noise
from analysis.checks.uncertainty import (Approach1Stat, Approach2Stat, Approach3Stat, backtest, bootstrap)
from analysis.laws import downstream
from analysis.laws.approach3 import Approach3Fit, TokenCost
from analysis.laws.data_constrained import fit_data_constrained
from analysis.laws.data_constrained import markdown_section as dc_markdown
from analysis.laws.fits import fit_approach1, fit_approach2, fit_kaplan, isoflop_key, lower_envelope
from analysis.laws.lr import lr_sweeps
from analysis.load import TARGETS, endpoint_curves, excluded, load_curves, load_runs_csv, load_sweep, usable
from analysis.report import downstream_plots, plots
from scaling.record import clean_json, write_json_atomic, write_text_atomic

APPROACHES = (1, 2, 3)



def fit_all(df: pd.DataFrame, *, approaches=APPROACHES, C: float | None = None, n_bootstrap: int = 200,
            curves: pd.DataFrame | None = None, seed: int = 0, n_jobs: int = 2, isoflop_method: str = "parabola",
            approach3_method: str = "huber") -> tuple[dict, dict]:
    """Fit the requested approaches on the usable runs of `df`. Returns (results for JSON, fitted objects for
    plots). A fit that cannot run on this data is reported with its reason instead of failing the others.

    Every approach fits against the table's C and is queried at the one `C_query` (`C`, else one decade beyond the
    largest run). Approach 2 groups runs by their planned budget; each slice's C is in the table's convention
    (analysis.fits.slice_C). `curves` (training curves, from
    metrics.jsonl) only draw the Kaplan L(C) frontier; Approach 1 fits valid points only (analysis.load.endpoint_curves).

    Seed replicates (analysis.checks.seeds): runs of one point at several seeds. Then results["seeds"] holds the seed
    spread, the bootstraps resample points with their seeds, Kaplan's L(N), L(D) take point means, and when the seed
    noise varies with N, D the fits are weighted by 1/sigma^2. Without replicates all of this is skipped: the same
    fits."""
    runs = usable(df)
    if runs.empty:
        raise ValueError("no usable runs: every run is excluded (see the excluded list); nothing to fit")
    noise = seed_noise(runs)
    weighted = noise is not None and noise.weighted
    if noise is not None:
        runs = noise.runs  # + the point id and its sigma / weights
    bad = sorted(set(approaches) - set(APPROACHES))
    if bad:
        raise ValueError(f"approach {bad} is unknown; choose from 1, 2, 3 (e.g. --approach 2,3)")
    fpt = float(np.median(runs["flops_per_token"]))
    if C is None:  # default: one decade beyond the largest planned budget (IsoFLOP sweeps), else the largest run
        largest = runs["budget_C"].max() if "budget_C" in runs and runs["budget_C"].notna().all() else np.nan
        C = float(largest if np.isfinite(largest) else runs["C"].max()) * 10
    res = {"conventions": {"N": str(df["N_convention"].iloc[0]), "C": str(df["C_convention"].iloc[0]),
                           "flops_per_token": fpt, "target": str(df["target"].iloc[0]) if "target" in df else "loss"},
           "n_runs": int(len(df)), "n_used": int(len(runs)), "C_query": C,
           "excluded": excluded(df)[["name", "status", "reason"]].to_dict("records")}
    fitted: dict = {}
    if noise is not None:
        res["seeds"], fitted["seeds"] = noise.as_dict(), noise

    def w_of(col):  # a weight column, or None (unweighted) when the noise is the same everywhere / unmeasured
        return col if weighted else None

    def attempt(key, fn):
        try:
            res[key] = fn()
        except ValueError as exc:
            res[key] = {"error": str(exc)}

    boot = dict(n_resamples=n_bootstrap, seed=seed, n_jobs=n_jobs)
    if noise is not None:
        boot["group"] = POINT  # a cluster bootstrap: a point with all its seeds (analysis.checks.uncertainty)

    def kaplan():
        out = {}
        # With replicates, the best point per size by its mean over seeds: a minimum over seeds is biased low.
        points = point_means(noise) if noise is not None else None
        for var in ("N", "D"):
            if points is None:
                best = runs.groupby(var)["loss"].min()
                X, L, w = best.index, best.to_numpy(), None
            else:
                best = points.loc[points.groupby(var)["loss"].idxmin()]
                X, L, w = best[var].to_numpy(), best["loss"].to_numpy(), best[W_LOG] if weighted else None
            if len(best) >= 3:
                fitted[f"kaplan_{var}"] = fit_kaplan(X, L, variable=var, weights=w)
                out[f"L({var})"] = fitted[f"kaplan_{var}"].as_dict()
        # Kaplan et al. 2020 fit L(C_min) on the compute-efficient frontier of training curves when we have them.
        fx, fy = lower_envelope(*((curves["C"], curves["loss"]) if curves is not None else (runs["C"], runs["loss"])))
        fitted["kaplan_C"] = fit_kaplan(fx, fy, variable="C")
        out["L(C)"] = fitted["kaplan_C"].as_dict()
        return out

    def approach1():
        # Valid points only: each model size's curve runs through its runs' final losses (intermediate losses of a
        # cosine run, or a WSD run's stable phase, are not losses of runs of that length).
        ends = endpoint_curves(df)
        if not (ends.groupby("run").size() >= 2).any():
            raise ValueError("every model size was trained to one D only, so no size has a curve of valid points: "
                             "Approach 1 needs sizes trained to several D (a ladder's branches, a size on several "
                             "IsoFLOP budget lines, a size x tokens grid); a run's intermediate losses are not runs "
                             "of that length")
        fitted["a1"] = fit_approach1(ends)
        stat = Approach1Stat(C=C)
        out = _with_ci(stat, ends, boot | {"group": "run"})
        out["points"] = (f"the final losses of {len(ends)} runs, one curve per model size through its runs' ends "
                         f"({ends['run'].nunique()} sizes): intermediate losses of a run are not runs of that length")
        return out

    def approach2():
        fitted["a2"] = fit_approach2(runs, method=isoflop_method, run_weights=w_of(W_LOSS))
        stat = Approach2Stat(C=C, method=isoflop_method, run_weights=w_of(W_LOSS))
        out = _with_ci(stat, runs, boot, strata=isoflop_key(runs))
        fitted["a2_samples"] = out.pop("_samples", None)
        out["minima"] = fitted["a2"].minima[["C", "N_opt", "D_opt", "loss_opt", "n_runs"]].to_dict("records")
        out["skipped_budgets"] = fitted["a2"].skipped.to_dict("records")
        return out

    def approach3():
        # 1/sigma^2 in each fitter's residual units: log loss for the paper's Huber fit, loss for VPNLS
        w = w_of(W_LOG if approach3_method == "huber" else W_LOSS)
        full = Approach3Stat(method=approach3_method, n_starts=32, flops_per_token=fpt, weights=w).fit(runs)
        k = runs["flops_per_token"].to_numpy(float)
        spread = float(k.max() / k.min())
        # One k = C/(N D) describes the runs to within 25%: eq. 4's closed form. Otherwise (small models, whose
        # embedding/head FLOPs dwarf 6N) the optimum is taken on the family's own budget line D = C / f(N).
        cost = TokenCost.from_runs(runs) if spread > 1.25 and runs["N"].nunique() >= 2 else None
        stat = Approach3Stat(C=C, method=approach3_method, flops_per_token=fpt,
                             init=(full.E, full.A, full.B, full.alpha, full.beta), cost=cost, weights=w)
        out = _with_ci(stat, runs, boot)
        out.pop("_samples", None)
        out.update({k: v for k, v in full.as_dict(C).items() if not isinstance(v, float) or k not in out})
        if cost is not None:
            out["allocation"] = (f"family budget line D = C / f(N), f read off the runs (C/(N D) varies {spread:.3g}x "
                                 "over them); a, b, G are eq. 4's, which assume one k")
        fitted["a3"] = full  # only a fit with a compute-optimal allocation is plotted (as_dict raises otherwise)
        return out

    attempt("kaplan", kaplan)
    for k, fn in ((1, approach1), (2, approach2), (3, approach3)):
        if k in approaches:
            attempt(f"approach{k}", fn)
    if 2 in approaches and isoflop_key(runs) == "budget":  # IsoFLOP curves to flag (analysis.checks.quality)
        def quality():
            fitted["quality"] = isoflop_quality(runs)
            return fitted["quality"].as_dict()
        attempt("isoflop_quality", quality)
    if "epochs" in runs.columns and runs["epochs"].max() > 1.5:  # repeated data: Muennighoff et al. 2023
        def data_constrained():
            out = fit_data_constrained(runs, n_bootstrap=n_bootstrap, seed=seed, n_jobs=n_jobs)
            fitted["data_constrained"] = out.pop("_fit")
            return out
        attempt("data_constrained", data_constrained)
    for v in res.values():
        if isinstance(v, dict):
            v.pop("_samples", None)
    return clean_json(res), fitted


def _with_ci(stat, table, boot, **kw) -> dict:
    if boot["n_resamples"] <= 0:
        return stat(table)
    b = bootstrap(table, stat, **boot, **kw)
    # A runaway interval is reported as "not identified (reason)", not as numbers (analysis.checks.identify).
    return mark_identification(b.as_dict(), stat) | {"_samples": b.samples}


# --------------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(d: dict, keys) -> list[str]:
    ci, ident = d.get("ci95", {}), d.get("identification")
    lines = ["| symbol | estimate | 95% interval |", "|---|---|---|"]
    for k in keys:
        if k in d:
            lo_hi, note = ci.get(k), describe(k, ident)
            if note and note.startswith("not identified ("):  # no numbers for a parameter the data do not pin down
                lines.append(f"| {k} | not identified | {note[len('not identified ('):-1]} |")
                continue
            interval = '[' + _fmt(lo_hi[0]) + ', ' + _fmt(lo_hi[1]) + ']' if lo_hi else '-'
            lines.append(f"| {k} | {_fmt(d[k])} | {interval}{' (' + note + ')' if note else ''} |")
    return lines


def markdown(res: dict, figures: list[str], title: str) -> str:
    conv = res["conventions"]
    L = [f"# Scaling-law report: {title}", "",
         f"Runs: {res['n_runs']} in the table, {res['n_used']} used in fits, {len(res['excluded'])} excluded.", "",
         "## Conventions", "",
         f"- N: {conv['N']} parameters; C: {conv['C']} (flops per token k = C/(N D) = {conv['flops_per_token']:.4g})",
         f"- loss: final validation loss in {TARGETS[conv.get('target', 'loss')]}"
         + ("" if conv.get("target", "loss") == "loss" else f" ({conv['target']}: the loss per token / ln 2 / the "
            "validation text's bytes (characters) per token, Gao et al. 2020 sec. 4)")
         + "; intervals: 95% percentile bootstrap over "
         + ("points (each with all its seeds)" if res.get("seeds") else "runs"), ""]
    L += ["## Excluded runs", ""]
    if res["excluded"]:
        L += ["| run | status | reason |", "|---|---|---|"] + [
            f"| {e['name']} | {e['status']} | {e['reason']} |" for e in res["excluded"]]
    else:
        L.append("None.")
    L += _seeds_markdown(res.get("seeds"))
    L += _lr_markdown(res.get("lr_sweeps") or [])
    sections = [("kaplan", "Kaplan et al. 2020 power laws", None),
                ("approach1", "Chinchilla Approach 1 (envelope of each size's final losses over C)", ["a", "b", "k_N", "k_D", "N_opt", "D_opt"]),
                ("approach2", "Chinchilla Approach 2 (IsoFLOP parabolas)", ["a", "b", "k_N", "k_D", "N_opt", "D_opt"]),
                ("approach3", "Chinchilla Approach 3 (parametric L(N, D) = E + A/N^alpha + B/D^beta)",
                 ["E", "A", "B", "alpha", "beta", "a", "b", "N_opt", "D_opt", "L_opt"])]
    for key, name, keys in sections:
        if key not in res:
            continue
        L += ["", f"## {name}", ""]
        d = res[key]
        if "error" in d:
            L.append(f"Not fitted: {d['error']}")
            continue
        if key == "kaplan":
            for law, f in d.items():
                L.append(f"- {law}: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in f.items()))
            continue
        if d.get("points"):
            L += [f"Points: {d['points']}.", ""]
        if d.get("allocation"):
            L += [f"N_opt, D_opt, L_opt below: on the {d['allocation']}.", ""]
        if "N_opt" in d:
            L.append(f"N_opt, D_opt{', L_opt' if 'L_opt' in d else ''} at C = {res['C_query']:.3g} FLOPs "
                     f"({conv['C']}).")
            L.append("")
        L += _table(d, keys)
        if d.get("n_resamples") is not None:
            L += ["", f"{d['n_resamples']} bootstrap resamples, {d['n_failed']} failed fits (left out)."]
        if d.get("skipped_budgets"):
            L += ["", "Budgets left out of Approach 2:"] + [f"- C={s['C']:.3g}: {s['reason']}"
                                                            for s in d["skipped_budgets"]]
    L += quality_markdown(res.get("isoflop_quality"))
    L += dc_markdown(res["data_constrained"]) if "data_constrained" in res else []
    if "backtest" in res:
        L += ["", "## Backtest", "", "| quantity | value |", "|---|---|"] + [
            f"| {k} | {_fmt(v)} |" for k, v in res["backtest"].items()]
    L += downstream.markdown_section(res.get("downstream"))
    L += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(L) + "\n"


def _seeds_markdown(seeds: dict | None) -> list[str]:
    """The "Seed spread" section (analysis.checks.seeds): each point's runs over seeds, the pooled noise, how fits were
    weighted. None (no point has two seeds): no section."""
    if not seeds:
        return []
    L = ["", "## Seed spread", "",
         f"{seeds['n_replicated']} of {seeds['n_points']} points were trained at 2 or more seeds ({seeds['n_runs']} "
         "runs). A point is the runs with equal N, D, planned budget and lr; its loss is their mean and sigma their "
         "standard deviation over seeds (ddof=1).", "",
         "| N | D | budget C | lr | n | seeds | mean loss | sigma | sigma / mean |",
         "|---|---|---|---|---|---|---|---|---|"]
    for p in seeds["points"]:
        L.append(f"| {_fmt(p['N'])} | {_fmt(p['D'])} | {_fmt(p['budget'])} | {_fmt(p['lr'])} | {p['n']} | "
                 f"{','.join(map(str, p['seeds'])) or '-'} | {_fmt(p['loss'])} | {_fmt(p['sigma'])} | "
                 + (f"{p['rel_sigma']:.2%} |" if p["rel_sigma"] is not None else "- |"))
    L += ["", "- pooled sigma of log loss (relative sigma) over the replicated points: "
          f"{_fmt(seeds['pooled_sigma_log'])} on {seeds['dof']} degrees of freedom (the within-point mean square, "
          "sum (n-1) s^2 / sum (n-1)); a point of one run is given it unless the fits are weighted by a trend (below)",
          f"- fits: {seeds['weighting']}",
          "- intervals: a bootstrap over points, each drawn with all its seeds (within budgets for Approach 2)"]
    return L


def _lr_markdown(sweeps: list[dict]) -> list[str]:
    """The "Learning-rate sweeps" section: one table per group of runs that differ only in lr (none: no section)."""
    if not sweeps:
        return []
    L = ["", "## Learning-rate sweeps", "",
         "Runs with the same N and budget at several peak learning rates. The optimum is the minimum of a parabola in "
         "ln(lr) through the best lr and its neighbours (as in Wortsman et al. 2023; Bi et al. 2024); a best lr at "
         "the end of the grid has no interior minimum, and the sweep should be widened on that side."]
    for g in sweeps:
        budget = f"C = {g['budget']:.3g} FLOPs, " if g.get("budget") else ""
        L += ["", f"### N = {g['N']:.4g}, {budget}D = {g['D']:.4g} tokens", "",
              "| lr | loss | runs used | status |", "|---|---|---|---|"]
        for p in g["points"]:
            L.append(f"| {p['lr']:.3g} | {_fmt(p['loss'])} | {p['n_used']}/{p['n_runs']} | {p['status']} |")
        L.append("")
        if g["best_lr"] is not None:
            L.append(f"- best lr on the grid: {g['best_lr']:.3g} (loss {g['best_loss']:.4g})")
        if g["lr_opt"] is not None:
            lo, hi = g["window"]
            L.append(f"- interpolated optimum: lr {g['lr_opt']:.3g} (loss {g['loss_opt']:.4g}), parabola in ln(lr) "
                     f"through lr {lo:.3g}-{hi:.3g}")
        elif g["edge"]:
            L.append(f"- **best lr at the {g['edge']} end of the grid: widen the sweep** ({g['note']})")
        else:
            L.append(f"- no interpolated optimum: {g['note']}")
        if g["excluded"]:
            L.append("- excluded from this group: " + "; ".join(
                f"{e['name']} (lr {e['lr']:.3g}, {e['status']})" for e in g["excluded"]))
    return L


def make_plots(runs: pd.DataFrame, fitted: dict, res: dict, out_dir: Path,
               curves: pd.DataFrame | None = None) -> list[Path]:
    noise = fitted.get("seeds")
    spread = noise.points[noise.points["replicated"]] if noise is not None else None  # +-sigma error bars
    paths = plots.plot_loss_vs_compute(runs, out_dir, fitted.get("kaplan_C"), curves, spread)
    a2, a3 = fitted.get("a2"), fitted.get("a3")
    if a2 is not None:
        q = fitted.get("quality")
        paths += plots.plot_isoflops(runs, a2, out_dir, spread, q.flagged if q is not None else None,
                                     dict(zip(q.budgets["budget"], q.budgets["flags"])) if q is not None else None)
        paths += plots.plot_optimal_allocation(a2.minima, a2.N_opt, a2.D_opt, out_dir, fitted.get("a2_samples"),
                                               extend_to=res.get("C_query"))
    if isinstance(a3, Approach3Fit):
        paths += plots.plot_residuals(runs, a3, out_dir)
        paths += plots.plot_contours(runs, a3, out_dir)
    if fitted.get("data_constrained") is not None:  # fitted L against observed, residuals (analysis.laws.law)
        from analysis.laws.law import plot_law_fit

        paths += plot_law_fit(fitted["data_constrained"], runs, out_dir)
    if res.get("downstream"):  # evaluated runs: accuracy vs N beside the log-likelihood, and the two-step fits
        paths += downstream_plots.plot_emergence(runs, [r["task"] for r in res["downstream"]], out_dir)
        paths += downstream_plots.plot_accuracy_vs_loss(runs, res["downstream"], out_dir)
    return paths


def write_report(source: str | Path, out_dir: str | Path | None = None, *, n: str = "non_embedding",
                 c: str | None = None, C: float | None = None, n_bootstrap: int = 200,
                 backtest_below: float | None = None, n_jobs: int = 2, seed: int = 0, skip_corrupt: bool = False,
                 mixed_data: bool = False, target: str = "loss") -> Path:
    """Load a sweep directory (or a runs.csv that `scaling.sweep.schedule collect` wrote), fit everything, and write
    report.md, results.json and figures/ into `out_dir` (default: SWEEP_DIR/report, or report/ next to the CSV).
    C is in the records' own convention unless `c` asks another; `skip_corrupt`, `mixed_data` and `target` (the fits'
    L: loss per token, bpb or bits_per_char) as in load_sweep. Returns the report path."""
    source = Path(source)
    if source.is_file():  # a collected run table (load_runs_csv says so when it is not one)
        df, curves = load_runs_csv(source, n=n, c=c, target=target), None
    else:
        df = load_sweep(source, n=n, c=c, skip_corrupt=skip_corrupt, mixed_data=mixed_data, target=target)
        try:
            curves = load_curves(source, n=n, c=c, mixed_data=mixed_data, target=target)
        except ValueError:
            curves = None
    res, fitted = fit_all(df, C=C, n_bootstrap=n_bootstrap, curves=curves, n_jobs=n_jobs, seed=seed)
    sweeps = lr_sweeps(df)
    if sweeps:
        res["lr_sweeps"] = clean_json([s.as_dict() for s in sweeps])
    runs = usable(df)
    if downstream.eval_tasks(df):  # the "Downstream" section, only for evaluated runs
        res["downstream"] = clean_json(downstream.analyze_all(df, n_bootstrap=n_bootstrap, seed=seed, n_jobs=n_jobs))
    if backtest_below is not None:
        try:
            res["backtest"] = clean_json(backtest(runs, backtest_below).summary())
        except ValueError as exc:
            res["backtest"] = {"error": str(exc)}
    out = Path(out_dir) if out_dir else (source.parent if source.is_file() else source) / "report"
    figs = plots.plot_lr_sweeps(sweeps, out / "figures") if sweeps else []
    figs += make_plots(runs, fitted, res, out / "figures", curves)
    rel = [str(p.relative_to(out)) for p in figs if p.suffix == ".png"]
    write_json_atomic(out / "results.json", res, indent=1)
    report = out / "report.md"
    write_text_atomic(report, markdown(res, rel, source.parent.name if source.is_file() else source.name))
    return report

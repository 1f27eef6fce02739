"""CLI: `python -m analysis {fit,report,predict,verify,bench}` (see the README's analysis section)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from analysis.load import (TARGETS, is_runs_csv, load_csv, load_curves, load_runs_csv, load_sweep, load_wandb_api,
                           load_wandb_offline, usable, wandb_api, wandb_path)
from scaling.accounting import C_CONVENTIONS
from scaling.record import write_json_atomic, write_text_atomic

EPILOG = """examples:
  python -m analysis fit --csv runs.csv --N params --D tokens --loss loss --C budget --approach 2,3 --json fit.json
  python -m analysis fit --sweep outputs/sweep --approach 1,2,3 --bootstrap 200 --plots figs/
  python -m analysis fit --wandb outputs/sweep --approach 2     # the runs' offline wandb files
  python -m analysis fit --wandb my-team/scaling/isoflop-quickstart   # ENTITY/PROJECT[/GROUP] via the wandb API
  python -m analysis report outputs/sweep --at-C 1e21
  python -m analysis report outputs/sweep --target bpb --wandb   # fit bits per byte; log the report to wandb
  python -m analysis report outputs/sweep/runs.csv --out report/   # a collected run table (no Approach 1)
  python -m analysis predict outputs/sweep --at-C 4e21 --out study/   # commit study/prediction.json, then train
  python -m analysis verify study/prediction.json outputs/verify --out study/
  python -m analysis compare outputs/sweep_a outputs/sweep_b --out cmp/   # fits side by side, compute multiplier
  python -m analysis downstream outputs/sweep --task cloze --predict-C 1e16   # accuracy: fit, prediction, backtest
  python -m analysis fit --csv multirun/data_constrained/runs.csv --law data_constrained   # repeated data
  python -m analysis fit --sweep outputs/sweep --law-expr "E + A/N**alpha + B/D**beta" --param E=0.1:10:1,2 \
      --param A=1:1e12:10,1e4:log --param B=1:1e12:10,1e4:log --param alpha=0:2:0.3 --param beta=0:2:0.3
  python -m analysis fit --sweep outputs/sweep --law my_laws.py:LAW   # LAW = analysis.laws.law.Law(...) in my_laws.py
  python -m analysis extrapolation misfitting2025_scaling_results.csv --out extrap/   # fit small, predict 10-20x
  python -m analysis bench"""


def _approaches(text: str) -> tuple[int, ...]:
    try:
        out = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--approach {text!r}: give a comma list of 1, 2, 3 (e.g. 2,3)") from None
    if not out or not set(out) <= {1, 2, 3}:
        raise argparse.ArgumentTypeError(f"--approach {text!r}: give a comma list of 1, 2, 3 (e.g. 2,3)")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    f = sub.add_parser("fit", help="fit scaling laws to a CSV, a sweep directory or offline wandb runs")
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", type=Path, help="CSV with one row per run")
    src.add_argument("--sweep", type=Path, help="sweep directory of run records (record.json + metrics.jsonl)")
    src.add_argument("--wandb", help="folder of offline wandb runs (wandb.init(dir=...)), or ENTITY/PROJECT[/GROUP] "
                                      "read through the wandb API (needs `wandb login`)")
    f.add_argument("--N", default="N", help="column (CSV) or summary key (wandb) holding N [N]")
    f.add_argument("--D", default="D", help="column/key holding D, tokens [D]")
    f.add_argument("--loss", default="loss", help="column/key holding the final loss [loss]")
    f.add_argument("--C", default=None,
                   help="column/key holding C, also the IsoFLOP budget (default: a collected runs.csv or wandb "
                        "summary gives C and the budget in the runs' own convention; another CSV: C = 6ND)")
    f.add_argument("--name", default=None, help="CSV column naming runs (bootstrap resamples runs by it)")
    f.add_argument("--dropna", action="store_true", help="drop CSV rows with empty values instead of failing")
    _common(f)
    _sweep_reading(f)
    f.add_argument("--approach", type=_approaches, default=(2, 3), help="comma list of 1,2,3 [2,3]; 1 needs --sweep")
    f.add_argument("--json", type=Path, help="write results (paper symbols, ci95 intervals) here")
    f.add_argument("--plots", type=Path, help="write figures (PNG + SVG) into this folder")
    law = f.add_mutually_exclusive_group()
    law.add_argument("--law", help="fit this law instead of the approaches: a built-in (chinchilla, kaplan_N, kaplan_ND, "
                                   "data_constrained) or FILE.py:NAME, an analysis.laws.law.Law object in a Python "
                                   "file")
    law.add_argument("--law-expr", dest="law_expr",
                     help="fit a law written as a formula of N, D, C, epochs, U_D (unique tokens) and parameters, "
                          "e.g. 'E + A/N**alpha'; functions exp log sqrt abs tanh minimum maximum; each parameter "
                          "declared with --param")
    f.add_argument("--param", action="append", default=[], metavar="NAME=LO:HI:INIT[,INIT...][:log]",
                   help="a --law-expr parameter: bounds LO..HI and the initial values tried (all combinations over "
                        "parameters, the best 32 refined); ':log' fits it in log space (positive scales), e.g. "
                        "--param E=0.1:10:1,2 --param A=1:1e12:10,1e4:log --param alpha=0:2:0.3,0.6")
    f.add_argument("--law-backtest-N", dest="law_backtest_N", type=float, default=None,
                   help="with --law/--law-expr: also fit the runs with N below this and predict the larger ones")

    r = sub.add_parser("report", help="all fits, figures and a Markdown report for a sweep directory or its runs.csv")
    r.add_argument("sweep_dir", type=Path, help="a sweep directory, or the runs.csv `scaling.sweep.schedule collect` wrote")
    r.add_argument("--out", type=Path, help="output folder [SWEEP_DIR/report]")
    r.add_argument("--wandb", action="store_true",
                   help="also log the fit tables, figures and headline numbers to a wandb run (job_type analysis) in "
                        "the sweep's group: offline unless WANDB_MODE says otherwise or an API key is set")
    r.add_argument("--wandb-project", dest="wandb_project", help="wandb project [the runs' logging.project]")
    r.add_argument("--wandb-group", dest="wandb_group", help="wandb group [the sweep's name, the runs' group]")
    _common(r)
    _sweep_reading(r)

    pr = sub.add_parser("predict", help="commit a prediction: the compute-optimal N, D and loss at a larger budget")
    pr.add_argument("sweep_dir", type=Path, help="a sweep directory, or the runs.csv `scaling.sweep collect` wrote")
    pr.add_argument("--at-C", type=float, required=True, dest="at_C", help="the budget to predict, e.g. 4x the largest")
    pr.add_argument("--out", type=Path, required=True, help="folder for prediction.json and prediction.md")
    pr.add_argument("--headline", default="auto", choices=["auto", "approach2", "approach3"],
                    help="whose N, D, L is the committed prediction [auto: the smaller loss error when the largest "
                         "budget is predicted from the others]")
    pr.add_argument("--l-form", default="irreducible", choices=["irreducible", "pure", "average", "local"],
                    dest="l_form",
                    help="Approach 2's L_opt(C) through the IsoFLOP minima: with an irreducible term, a pure power "
                         "law, their mean with both intervals joined (when the fitted budgets cannot tell them apart), or "
                         "local: a line in log C through the minima of the top doubling of budgets [irreducible]")
    pr.add_argument("--n-convention", default="non_embedding", choices=["non_embedding", "total"])
    pr.add_argument("--target", default="loss", choices=list(TARGETS),
                    help="the L to predict: loss per token, or bits per byte / character (verify reads it back) [loss]")
    _c_convention(pr)
    pr.add_argument("--isoflop-method", default="parabola", choices=["parabola", "akima"])
    pr.add_argument("--bootstrap", type=int, default=200)
    pr.add_argument("--jobs", type=int, default=2)
    pr.add_argument("--seed", type=int, default=0)
    _sweep_reading(pr)

    v = sub.add_parser("verify", help="score a committed prediction on the runs trained at its budget")
    v.add_argument("prediction", type=Path, help="prediction.json written by `predict`")
    v.add_argument("sweep_dir", type=Path, help="the verification sweep (runs at the predicted budget), or its runs.csv")
    v.add_argument("--out", type=Path, required=True, help="folder for verification.json and verification.md")
    _sweep_reading(v)

    ds = sub.add_parser("downstream", help="task accuracy against loss and scale (two-step fit, prediction, backtest)")
    ds.add_argument("source", type=Path, help="a sweep directory of evaluated runs, or its runs.csv")
    ds.add_argument("--task", help="comma list of tasks [every task with eval_<task>_acc columns]")
    ds.add_argument("--predict-C", type=float, default=None, dest="predict_C",
                    help="predict the accuracy of the compute-optimal run at this C [10x the largest run]")
    ds.add_argument("--metric", default="acc", choices=["acc", "acc_norm"], help="accuracy or its length-normalized "
                    "variant [acc]")
    ds.add_argument("--x", default="loss", choices=["loss", "task_loss"],
                    help="step 2's loss: the validation loss, or the task loss (-log-likelihood of the correct answer, "
                         "Bhagia et al. 2024) [loss]")
    ds.add_argument("--law", default="auto", choices=["auto", "approach3", "kaplan_C"],
                    help="step 1: L(N, D) (Approach 3) or L(C) on the compute frontier [auto: Approach 3 when N and D "
                         "vary apart over 6+ runs]")
    ds.add_argument("--ceiling", type=float, default=None, help="fix the sigmoid's ceiling (e.g. 1) [fitted in "
                    "[chance, 1]]")
    ds.add_argument("--hold", default="N", choices=["N", "C"], help="backtest: hold out the largest N or C [N]")
    ds.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples over runs, 0 = none [200]")
    ds.add_argument("--jobs", type=int, default=2)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--n-convention", default="non_embedding", choices=["non_embedding", "total"])
    _c_convention(ds)
    _sweep_reading(ds)
    ds.add_argument("--json", type=Path, help="write the results here")
    ds.add_argument("--plots", type=Path, help="write the emergence and accuracy-vs-loss figures into this folder")

    cp = sub.add_parser("compare", help="two or more sweeps: their fits side by side and the compute multiplier")
    cp.add_argument("sweeps", type=Path, nargs="+", help="sweep directories or their runs.csv; the first is the "
                                                         "reference the multipliers are over")
    cp.add_argument("--out", type=Path, required=True, help="folder for compare.md, compare.json and figures/")
    cp.add_argument("--names", help="comma list of names, one per sweep [their folder names]")
    cp.add_argument("--at-loss", type=float, default=None, dest="at_loss",
                    help="the loss at which C_first(L) / C_sweep(L) is read [the middle of the common range]")
    cp.add_argument("--at-C", type=float, default=None, dest="at_C",
                    help="report every sweep's N_opt at this C [10x the largest run of any sweep]")
    cp.add_argument("--approach", type=_approaches, default=(2, 3), help="fits shown side by side [2,3]")
    cp.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per sweep, 0 = none [200]")
    cp.add_argument("--jobs", type=int, default=2)
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--n-convention", default="non_embedding", choices=["non_embedding", "total"])
    _c_convention(cp)

    ex = sub.add_parser("extrapolation", help="backtest fitting choices: fit small models, predict 10-20x larger")
    ex.add_argument("csv", type=Path, help="the (Mis)Fitting testbed's scaling_results.csv (one row per checkpoint)")
    ex.add_argument("--out", type=Path, required=True, help="folder for extrapolation.json and extrapolation.md")
    ex.add_argument("--n-column", default="N_no_emb", choices=["N_no_emb", "N"],
                    help="N fitted: non-embedding (N_no_emb) or all parameters (N) [N_no_emb]")
    ex.add_argument("--ratios", default="10,14,20", help="fit sizes N <= N_max / r for each r [10,14,20]")
    ex.add_argument("--no-combinations", action="store_true", help="only the one-at-a-time changes")
    ex.add_argument("--max-size", type=float, default=None, dest="max_size",
                    help="leave out sizes above this N first, so the largest left is the target (e.g. 4e8)")
    ex.add_argument("--method", default="both", choices=["both", "huber", "vpnls"],
                    help="fitter(s) of the law: Hoffmann's Huber + L-BFGS, VPNLS (seconds), or both [both]")

    b = sub.add_parser("bench", help="time the Approach 3 bootstrap (200 resamples of 250 points by default)")
    b.add_argument("--resamples", type=int, default=200)
    b.add_argument("--points", type=int, default=250)
    b.add_argument("--method", default="vpnls,huber", help="comma list of vpnls, huber")
    b.add_argument("--jobs", type=int, default=2)
    return p


def _c_convention(p: argparse.ArgumentParser) -> None:
    p.add_argument("--c-convention", default=None, choices=list(C_CONVENTIONS) + ["record"],
                   help="C in this FLOP convention, each run's C and budget converted through scaling.accounting "
                        "(6ND: 6*N*D with the chosen N) [the runs' own: the convention they were planned and recorded "
                        "in; 'record' says the same]. For a CSV with --C it names that column's convention")


def _sweep_reading(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-corrupt", action="store_true", dest="skip_corrupt",
                   help="list an unreadable record.json as a 'corrupt' run (left out of fits) instead of failing")
    p.add_argument("--allow-mixed-data", action="store_true", dest="mixed_data",
                   help="fit runs trained on different data or tokenizers together (refused by default: their "
                        "losses are not comparable)")


def _check_args(a: argparse.Namespace) -> None:
    """Values argparse's types let through but no fit can use: one ValueError naming the flag and the fix."""
    for flag, dest in (("--at-C", "at_C"), ("--backtest-below", "backtest_below")):
        v = getattr(a, dest, None)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{flag} {v:g}: give a positive, finite number of FLOPs, e.g. {flag} 1e21")
    n = getattr(a, "bootstrap", None)
    least = 2 if a.cmd == "predict" else 0  # a prediction is committed with its intervals
    if n is not None and (n < least or n == 1):
        raise ValueError(f"--bootstrap {n}: give " + ("" if least else "0 (no intervals) or ") +
                         "a number of resamples of at least 2 (200 is the default)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="loss", choices=list(TARGETS),
                   help="what the fits take as L: the loss per token, or bits per byte / character of the validation "
                        "text (runs with different tokenizers compare) [loss]")
    p.add_argument("--n-convention", default="non_embedding", choices=["non_embedding", "total"],
                   help="which N from run records [non_embedding, as Kaplan et al. 2020]")
    _c_convention(p)
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples over runs, 0 = none [200]")
    p.add_argument("--at-C", type=float, default=None, dest="at_C",
                   help="report N_opt, D_opt, L at this C [10x the largest run]")
    p.add_argument("--isoflop-method", default="parabola", choices=["parabola", "akima"],
                   help="Approach 2 minimum: Hoffmann parabola or Porian et al. 2024 Akima interpolation")
    p.add_argument("--backtest-below", type=float, default=None, help="also backtest: fit budgets below this C")
    p.add_argument("--jobs", type=int, default=2, help="worker processes for the bootstrap [2]")
    p.add_argument("--seed", type=int, default=0)


def _summary(res: dict) -> str:
    lines = [f"runs: {res['n_runs']} ({res['n_used']} used, {len(res['excluded'])} excluded); "
             f"N={res['conventions']['N']}, C={res['conventions']['C']}"]
    for e in res["excluded"]:
        lines.append(f"  excluded {e['name']}: {e['reason']}")
    for key, syms in (("approach1", "a b"), ("approach2", "a b"), ("approach3", "E A B alpha beta a b"),):
        d = res.get(key)
        if d is None:
            continue
        if "error" in d:
            lines.append(f"{key}: not fitted: {d['error']}")
            continue
        parts = []
        for s in syms.split() + ["N_opt", "D_opt", "L_opt"]:
            if s in d:
                ci = d.get("ci95", {}).get(s)
                if not (d.get("identification") or {}).get(s, {}).get("identified", True):
                    parts.append(f"{s} not identified")  # analysis.checks.identify: no numbers for a runaway interval
                    continue
                parts.append(f"{s}={d[s]:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""))
        lines.append(f"{key}: " + ", ".join(parts))
    if res.get("seeds"):
        sd = res["seeds"]
        how = "weighted by 1/sigma^2" if sd["weighted"] else "unweighted"
        lines.append(f"seeds: {sd['n_replicated']} of {sd['n_points']} points replicated, pooled sigma of log loss "
                     f"{sd['pooled_sigma_log']:.3g}; fits {how}")
    if "N_opt" in res.get("approach3", {}):
        over = "points with their seeds" if res.get("seeds") else "runs"
        lines.append(f"(N_opt, D_opt, L_opt at C={res['C_query']:.3g}; intervals: 95% bootstrap over {over})")
    return "\n".join(lines)


def cmd_fit(a) -> int:
    from analysis.report import fit_all, make_plots

    curves = None
    if not a.sweep and (a.skip_corrupt or a.mixed_data):
        raise ValueError("--skip-corrupt and --allow-mixed-data read run records: use them with --sweep")
    if a.csv and a.C is None and is_runs_csv(a.csv):  # a collected run table: every convention, the budgets
        df = load_runs_csv(a.csv, n=a.n_convention, c=a.c_convention, target=a.target)
    elif a.csv:
        if a.target != "loss":
            raise ValueError(f"--target {a.target} reads run records, a collected runs.csv or wandb summaries; for a "
                             f"CSV with your own columns name the {a.target} column with --loss")
        df = load_csv(a.csv, N=a.N, D=a.D, loss=a.loss, C=a.C, name=a.name, dropna=a.dropna,
                      c_convention=a.c_convention)
    elif a.sweep:
        df = load_sweep(a.sweep, n=a.n_convention, c=a.c_convention, skip_corrupt=a.skip_corrupt,
                        mixed_data=a.mixed_data, target=a.target)
        curves = load_curves(a.sweep, n=a.n_convention, c=a.c_convention, mixed_data=a.mixed_data,
                             target=a.target) if a.plots else None
    else:
        kw = dict(N="N_total" if a.n_convention == "total" and a.N == "N" else a.N, D=a.D, loss=a.loss, C=a.C,
                  budget=a.C, c_convention=a.c_convention, target=a.target)
        if Path(a.wandb).exists():  # a folder (or file) of offline runs
            df = load_wandb_offline(a.wandb, **kw)
        else:
            project, group = wandb_path(a.wandb)
            df = load_wandb_api(wandb_api(), project, group=group, **kw)
    if a.law or a.law_expr:
        return _fit_law(a, usable(df))
    res, fitted = fit_all(df, approaches=a.approach, C=a.at_C, n_bootstrap=a.bootstrap, curves=curves,
                          n_jobs=a.jobs, seed=a.seed, isoflop_method=a.isoflop_method)
    if a.backtest_below is not None:
        from analysis.checks.uncertainty import backtest

        res["backtest"] = backtest(usable(df), a.backtest_below).summary()
    print(_summary(res))
    if a.json:
        write_json_atomic(a.json, res, indent=1)
        print(f"wrote {a.json}")
    if a.plots:
        paths = make_plots(usable(df), fitted, res, a.plots, curves)
        print(f"wrote {len(paths)} figures to {a.plots}")
    return 0


def _fit_law(a, runs) -> int:
    """`fit --law` / `--law-expr`: one law, its intervals (and backtest, figure), instead of the approaches."""
    from analysis.report.law_results import fit_law_results, law_summary
    from analysis.laws.law import expression_law, load_law

    if a.param and not a.law_expr:
        raise ValueError("--param declares the parameters of a --law-expr formula; a --law brings its own")
    if runs.empty:
        raise ValueError("no usable runs to fit the law to; every run is excluded")
    try:
        law = load_law(a.law) if a.law else expression_law(a.law_expr, a.param)
    except FileNotFoundError as exc:  # main() prints ValueErrors as one `error:` line
        raise ValueError(str(exc)) from None
    res = fit_law_results(law, runs, n_bootstrap=a.bootstrap, seed=a.seed, n_jobs=a.jobs,
                          backtest_N_below=a.law_backtest_N, plots=a.plots)
    print(law_summary(res))
    if a.json:
        write_json_atomic(a.json, res, indent=1)
        print(f"wrote {a.json}")
    return 0


def cmd_report(a) -> int:
    from analysis.report import write_report

    path = write_report(a.sweep_dir, a.out, n=a.n_convention, c=a.c_convention, C=a.at_C, n_bootstrap=a.bootstrap,
                        backtest_below=a.backtest_below, n_jobs=a.jobs, seed=a.seed, skip_corrupt=a.skip_corrupt,
                        mixed_data=a.mixed_data, target=a.target)
    print(f"wrote {path}")
    if a.wandb:
        from analysis.report.wandb_report import log_report

        run = log_report(path.parent, a.sweep_dir, project=a.wandb_project, group=a.wandb_group)
        print(f"logged the report to wandb run {run['id']} ({run['mode']}, project {run['project']}, group "
              f"{run['group']}) in {run['dir']}" + (f"; upload it with `wandb sync {run['dir']}`"
                                                     if run["mode"] == "offline" else ""))
    return 0


def _load_runs(source: Path, n: str, c: str | None, a, target: str = "loss"):
    """A sweep directory's run records, or the runs.csv `scaling.sweep collect` wrote from them (what a study commits)."""
    if source.is_file():
        if a.skip_corrupt or a.mixed_data:
            raise ValueError("--skip-corrupt and --allow-mixed-data read run records: give the sweep directory")
        return load_runs_csv(source, n=n, c=c, target=target)
    return load_sweep(source, n=n, c=c, skip_corrupt=a.skip_corrupt, mixed_data=a.mixed_data, target=target)


def cmd_downstream(a) -> int:
    from analysis.laws import downstream
    from analysis.report import downstream_plots

    if a.predict_C is not None and not (math.isfinite(a.predict_C) and a.predict_C > 0):
        raise ValueError(f"--predict-C {a.predict_C:g}: give a positive, finite number of FLOPs, e.g. --predict-C 1e16")
    df = _load_runs(a.source, a.n_convention, a.c_convention, a)
    kw = dict(metric=a.metric, x=a.x, law=a.law, ceiling=a.ceiling, predict_C=a.predict_C, hold=a.hold,
              n_bootstrap=a.bootstrap, seed=a.seed, n_jobs=a.jobs)
    if a.task:  # named tasks: any that cannot be fitted is an error
        results = [downstream.analyze_task(df, t.strip(), **kw) for t in a.task.split(",") if t.strip()]
    else:
        results = downstream.analyze_all(df, **kw)
    print("\n".join(line for r in results for line in downstream.task_lines(r)))
    if a.json:
        write_json_atomic(a.json, results, indent=1)
        print(f"wrote {a.json}")
    if a.plots:
        paths = downstream_plots.plot_emergence(df, [r["task"] for r in results], a.plots, a.metric)
        paths += downstream_plots.plot_accuracy_vs_loss(df, results, a.plots)
        print(f"wrote {len(paths)} figures to {a.plots}")
    return 0


def cmd_bench(a) -> int:
    import numpy as np

    from analysis.synthetic import isoflop_runs
    from analysis.checks.uncertainty import Approach3Stat, bootstrap

    per = max(a.points // 10, 6)
    runs = isoflop_runs(budgets=np.logspace(17, 20, a.points // per), n_per_budget=per, noise=0.01)
    print(f"Approach 3 bootstrap: {a.resamples} resamples of {len(runs)} points, {a.jobs} worker(s)")
    for method in a.method.split(","):
        full = Approach3Stat(method=method, n_starts=32).fit(runs)
        stat = Approach3Stat(C=1e21, method=method, init=(full.E, full.A, full.B, full.alpha, full.beta))
        t = time.perf_counter()
        b = bootstrap(runs, stat, n_resamples=a.resamples, n_jobs=a.jobs)
        dt = time.perf_counter() - t
        ci = b.ci
        print(f"  {method:6s} {dt:6.1f} s  alpha={b.estimate['alpha']:.3f} {np.round(ci['alpha'], 3).tolist()}  "
              f"beta={b.estimate['beta']:.3f} {np.round(ci['beta'], 3).tolist()}  failed={b.n_failed}")
    return 0


def _write_json_and_markdown(out: Path, stem: str, obj: dict, md: str) -> int:
    write_json_atomic(out / f"{stem}.json", obj, indent=1)
    write_text_atomic(out / f"{stem}.md", md)
    print(md)
    print(f"wrote {out / stem}.json and {stem}.md")
    return 0


def cmd_predict(a) -> int:
    from analysis.checks.predict import predict, prediction_markdown

    runs = usable(_load_runs(a.sweep_dir, a.n_convention, a.c_convention, a, a.target))
    if runs.empty:
        raise ValueError(f"{a.sweep_dir}: no usable runs to fit; finish the sweep first")
    conventions = {"N": a.n_convention, "C": str(runs["C_convention"].iloc[0]), "sweep": str(a.sweep_dir),
                   "target": a.target}
    p = predict(runs, a.at_C, headline=a.headline, n_bootstrap=a.bootstrap, seed=a.seed, n_jobs=a.jobs,
                isoflop_method=a.isoflop_method, conventions=conventions, l_form=a.l_form)
    return _write_json_and_markdown(a.out, "prediction", p, prediction_markdown(p))


def cmd_verify(a) -> int:
    from analysis.report.plots import plot_verification
    from analysis.checks.predict import read_prediction, verification_markdown, verify

    prediction = read_prediction(a.prediction)
    conv = prediction.get("conventions", {})
    # the prediction's own target (predictions written before --target existed predicted the loss)
    runs = usable(_load_runs(a.sweep_dir, conv.get("N", "non_embedding"), conv.get("C"), a,
                             conv.get("target", "loss")))
    v = verify(prediction, runs)
    plot_verification(v, a.out / "figures")
    return _write_json_and_markdown(a.out, "verification", v, verification_markdown(v))


def cmd_extrapolation(a) -> int:
    from analysis.checks.extrapolation import comparison_markdown, write_comparison

    try:
        ratios = tuple(float(r) for r in a.ratios.split(","))
    except ValueError:
        raise ValueError(f"--ratios {a.ratios!r}: give a comma list of numbers > 1, e.g. 10,14,20") from None
    try:
        cmp = write_comparison(a.csv, a.out, n_column=a.n_column, ratios=ratios, combinations=not a.no_combinations,
                               methods=("huber", "vpnls") if a.method == "both" else (a.method,),
                               max_size=a.max_size)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(comparison_markdown(cmp))
    print(f"wrote {a.out / 'extrapolation.json'} and {a.out / 'extrapolation.md'}")
    return 0


def cmd_compare(a) -> int:
    from analysis.checks.compare import write_comparison

    names = [s.strip() for s in a.names.split(",")] if a.names else None
    try:
        md = write_comparison(a.sweeps, a.out, names=names, n=a.n_convention, c=a.c_convention, at_loss=a.at_loss,
                              C=a.at_C, n_bootstrap=a.bootstrap, seed=a.seed, n_jobs=a.jobs, approaches=a.approach)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(md.read_text())
    print(f"wrote {md}, {a.out / 'compare.json'} and {a.out / 'figures'}")
    return 0


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        _check_args(a)
        return {"fit": cmd_fit, "report": cmd_report, "predict": cmd_predict, "verify": cmd_verify,
                "bench": cmd_bench, "downstream": cmd_downstream, "compare": cmd_compare,
                "extrapolation": cmd_extrapolation}[a.cmd](a)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

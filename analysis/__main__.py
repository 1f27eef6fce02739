"""CLI: `python -m analysis {fit,report,predict,verify,bench}` (see the README's analysis section)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from analysis.load import (is_runs_csv, load_csv, load_curves, load_runs_csv, load_sweep, load_wandb_offline,
                           usable)
from scaling.accounting import C_CONVENTIONS
from scaling.record import write_json_atomic, write_text_atomic

EPILOG = """examples:
  python -m analysis fit --csv runs.csv --N params --D tokens --loss loss --C budget --approach 2,3 --json fit.json
  python -m analysis fit --sweep outputs/sweep --approach 1,2,3 --bootstrap 200 --plots figs/
  python -m analysis fit --wandb outputs/sweep --approach 2     # the runs' offline wandb files
  python -m analysis report outputs/sweep --at-C 1e21
  python -m analysis report outputs/sweep/runs.csv --out report/   # a collected run table (no Approach 1)
  python -m analysis predict outputs/sweep --at-C 4e21 --out study/   # commit study/prediction.json, then train
  python -m analysis verify study/prediction.json outputs/verify --out study/
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
    src.add_argument("--wandb", type=Path, help="folder of offline wandb runs (wandb.init(dir=...))")
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

    r = sub.add_parser("report", help="all fits, figures and a Markdown report for a sweep directory or its runs.csv")
    r.add_argument("sweep_dir", type=Path, help="a sweep directory, or the runs.csv `scaling.sweep.schedule collect` wrote")
    r.add_argument("--out", type=Path, help="output folder [SWEEP_DIR/report]")
    _common(r)
    _sweep_reading(r)

    pr = sub.add_parser("predict", help="commit a prediction: the compute-optimal N, D and loss at a larger budget")
    pr.add_argument("sweep_dir", type=Path)
    pr.add_argument("--at-C", type=float, required=True, dest="at_C", help="the budget to predict, e.g. 4x the largest")
    pr.add_argument("--out", type=Path, required=True, help="folder for prediction.json and prediction.md")
    pr.add_argument("--headline", default="auto", choices=["auto", "approach2", "approach3"],
                    help="whose N, D, L is the committed prediction [auto: the smaller loss error when the largest "
                         "budget is predicted from the others]")
    pr.add_argument("--n-convention", default="non_embedding", choices=["non_embedding", "total"])
    _c_convention(pr)
    pr.add_argument("--isoflop-method", default="parabola", choices=["parabola", "akima"])
    pr.add_argument("--bootstrap", type=int, default=200)
    pr.add_argument("--jobs", type=int, default=2)
    pr.add_argument("--seed", type=int, default=0)
    _sweep_reading(pr)

    v = sub.add_parser("verify", help="score a committed prediction on the runs trained at its budget")
    v.add_argument("prediction", type=Path, help="prediction.json written by `predict`")
    v.add_argument("sweep_dir", type=Path, help="the verification sweep (runs at the predicted budget)")
    v.add_argument("--out", type=Path, required=True, help="folder for verification.json and verification.md")
    _sweep_reading(v)

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
        df = load_runs_csv(a.csv, n=a.n_convention, c=a.c_convention)
    elif a.csv:
        df = load_csv(a.csv, N=a.N, D=a.D, loss=a.loss, C=a.C, name=a.name, dropna=a.dropna,
                      c_convention=a.c_convention)
    elif a.sweep:
        df = load_sweep(a.sweep, n=a.n_convention, c=a.c_convention, skip_corrupt=a.skip_corrupt,
                        mixed_data=a.mixed_data)
        curves = load_curves(a.sweep, n=a.n_convention, c=a.c_convention, mixed_data=a.mixed_data) if a.plots else None
    else:
        df = load_wandb_offline(a.wandb, N="N_total" if a.n_convention == "total" and a.N == "N" else a.N, D=a.D,
                                loss=a.loss, C=a.C, budget=a.C, c_convention=a.c_convention)
    res, fitted = fit_all(df, approaches=a.approach, C=a.at_C, n_bootstrap=a.bootstrap, curves=curves,
                          n_jobs=a.jobs, seed=a.seed, isoflop_method=a.isoflop_method)
    if a.backtest_below is not None:
        from analysis.uncertainty import backtest

        res["backtest"] = backtest(usable(df), a.backtest_below).summary()
    print(_summary(res))
    if a.json:
        write_json_atomic(a.json, res, indent=1)
        print(f"wrote {a.json}")
    if a.plots:
        paths = make_plots(usable(df), fitted, res, a.plots, curves)
        print(f"wrote {len(paths)} figures to {a.plots}")
    return 0


def cmd_report(a) -> int:
    from analysis.report import write_report

    path = write_report(a.sweep_dir, a.out, n=a.n_convention, c=a.c_convention, C=a.at_C, n_bootstrap=a.bootstrap,
                        backtest_below=a.backtest_below, n_jobs=a.jobs, seed=a.seed, skip_corrupt=a.skip_corrupt,
                        mixed_data=a.mixed_data)
    print(f"wrote {path}")
    return 0


def cmd_bench(a) -> int:
    import numpy as np

    from analysis.synthetic import isoflop_runs
    from analysis.uncertainty import Approach3Stat, bootstrap

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
    from analysis.predict import predict, prediction_markdown

    runs = usable(load_sweep(a.sweep_dir, n=a.n_convention, c=a.c_convention, skip_corrupt=a.skip_corrupt,
                             mixed_data=a.mixed_data))
    if runs.empty:
        raise ValueError(f"{a.sweep_dir}: no usable runs to fit; finish the sweep first")
    conventions = {"N": a.n_convention, "C": str(runs["C_convention"].iloc[0]), "sweep": str(a.sweep_dir)}
    p = predict(runs, a.at_C, headline=a.headline, n_bootstrap=a.bootstrap, seed=a.seed, n_jobs=a.jobs,
                isoflop_method=a.isoflop_method, conventions=conventions)
    return _write_json_and_markdown(a.out, "prediction", p, prediction_markdown(p))


def cmd_verify(a) -> int:
    from analysis.plots import plot_verification
    from analysis.predict import read_prediction, verification_markdown, verify

    prediction = read_prediction(a.prediction)
    conv = prediction.get("conventions", {})
    runs = usable(load_sweep(a.sweep_dir, n=conv.get("N", "non_embedding"), c=conv.get("C"),
                             skip_corrupt=a.skip_corrupt, mixed_data=a.mixed_data))
    v = verify(prediction, runs)
    plot_verification(v, a.out / "figures")
    return _write_json_and_markdown(a.out, "verification", v, verification_markdown(v))


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        _check_args(a)
        return {"fit": cmd_fit, "report": cmd_report, "predict": cmd_predict, "verify": cmd_verify,
                "bench": cmd_bench}[a.cmd](a)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

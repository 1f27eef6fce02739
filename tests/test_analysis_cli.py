"""The CLI (`python -m analysis fit|report`), the report, and the package's isolation from JAX and the trainer."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.__main__ import main
from analysis.synthetic import CHINCHILLA_TRUTH as T
from analysis.synthetic import isoflop_runs, write_sweep

REPO = Path(__file__).resolve().parents[1]
TRUE_A = T["beta"] / (T["alpha"] + T["beta"])


def test_import_and_fit_do_not_load_jax_or_trainer(tmp_path):
    """analysis may import the JAX-free scaling.record and scaling.accounting, nothing else of scaling."""
    code = ("import sys, analysis.report, analysis.__main__, analysis.checks.predict, analysis.report.plots\n"
            "from analysis.synthetic import isoflop_runs, write_sweep\n"
            "from analysis.report import fit_all\n"
            "from analysis.load import load_sweep\n"
            "res, _ = fit_all(isoflop_runs(), n_bootstrap=4, n_jobs=1)\n"
            "assert 'approach3' in res and 'error' not in res['approach3'], res\n"
            f"load_sweep(write_sweep({str(tmp_path / 's')!r}, isoflop_runs(n_per_budget=3)))\n"
            "allowed = {'scaling', 'scaling.record', 'scaling.accounting'}\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', 'orbax', "
            "'hydra') or m.split('.')[0] == 'scaling' and m not in allowed)\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture
def csv_file(tmp_path):
    runs = isoflop_runs(noise=0.005, n_per_budget=8).rename(columns={"N": "params", "D": "tokens", "budget": "C_b"})
    p = tmp_path / "runs.csv"
    runs[["name", "params", "tokens", "loss", "C_b"]].to_csv(p, index=False)
    return p


def test_fit_csv_writes_json_with_paper_symbols_and_intervals(csv_file, tmp_path, capsys):
    out = tmp_path / "fit.json"
    rc = main(["fit", "--csv", str(csv_file), "--N", "params", "--D", "tokens", "--loss", "loss", "--C", "C_b",
               "--name", "name", "--approach", "2,3", "--bootstrap", "6", "--jobs", "1", "--at-C", "1e21",
               "--json", str(out), "--plots", str(tmp_path / "figs")])
    assert rc == 0
    res = json.loads(out.read_text())
    a3, a2 = res["approach3"], res["approach2"]
    for k in ("E", "A", "B", "alpha", "beta", "a", "b", "N_opt", "D_opt", "L_opt"):
        lo, hi = a3["ci95"][k]
        assert lo <= hi, k
    assert a3["a"] == pytest.approx(TRUE_A, abs=0.03) and a2["a"] == pytest.approx(TRUE_A, abs=0.03)
    assert {"a", "b", "k_N", "k_D"} <= set(a2) and "ci95" in a2 and res["C_query"] == 1e21
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(
        f"{n}.{e}" for n in ("loss_vs_compute", "isoflops", "optimal_allocation", "residuals", "contours")
        for e in ("png", "svg"))
    assert "approach3: E=" in capsys.readouterr().out


@pytest.mark.parametrize("args, match", [
    (["--N", "nparams"], "column 'nparams' (for N) not found"),
])
def test_fit_cli_errors_are_clear(csv_file, capsys, args, match):
    base = ["fit", "--csv", str(csv_file), "--N", "params", "--D", "tokens", "--bootstrap", "0"]
    assert main(base + args) == 2
    assert match in capsys.readouterr().err


def test_fit_cli_rejects_bad_approach_list(csv_file, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--csv", str(csv_file), "--approach", "4"])
    assert "give a comma list of 1, 2, 3" in capsys.readouterr().err


def test_too_few_points_for_approach3_is_reported_not_crashed(tmp_path, capsys):
    p = tmp_path / "few.csv"
    p.write_text("N,D,loss\n1e6,1e9,3.0\n2e6,1e9,2.9\n4e6,1e9,2.8\n")
    assert main(["fit", "--csv", str(p), "--approach", "3", "--bootstrap", "0", "--json", str(tmp_path / "o.json")]) == 0
    res = json.loads((tmp_path / "o.json").read_text())
    assert "got 3 point(s), need at least 6" in res["approach3"]["error"]


def test_report_on_sweep_lists_excluded_runs_and_writes_figures(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", isoflop_runs(budgets=(1e17, 1e18, 1e19), n_per_budget=7, noise=0.005))
    out = subprocess.run([sys.executable, "-m", "analysis", "report", str(sweep), "--bootstrap", "8", "--jobs", "1",
                          "--backtest-below", "5e18"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    md = (sweep / "report" / "report.md").read_text()
    for needle in ("| failed-0 | failed | status failed: RuntimeError: out of memory |",
                   "| diverged-0 | diverged |", "| never-ran | missing |", "## Chinchilla Approach 1",
                   "## Chinchilla Approach 2", "## Chinchilla Approach 3", "| alpha |", "## Backtest",
                   "N: non_embedding parameters; C: 6N", "![contours](figures/contours.png)"):
        assert needle in md, needle
    res = json.loads((sweep / "report" / "results.json").read_text())
    assert res["n_used"] == 21 and {e["name"] for e in res["excluded"]} == {"failed-0", "diverged-0", "never-ran"}
    # One convention (the records' own, no flag) and one query C for every approach.
    assert res["conventions"]["C"] == "6N" and "mismatch" not in md and "convention)" not in md
    assert res["approach3"]["C"] == res["C_query"]
    assert not any("C_query" in res[k] or "C_axis" in res[k] for k in ("approach1", "approach2", "approach3"))
    # Approach 1 fits valid points only: here every size lies on one budget line, so there is no curve to fit
    assert "Not fitted: every model size was trained to one D only" in md
    assert md.count(f"at C = {res['C_query']:.3g} FLOPs (6N)") == 2
    figs = sweep / "report" / "figures"
    assert all((figs / f"{n}.png").stat().st_size > 10_000 for n in ("isoflops", "contours", "optimal_allocation"))


def test_report_on_missing_dir_fails_cleanly(tmp_path, capsys):
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "absent").exists()


def family_sweep(root, convention="chinchilla"):
    """IsoFLOP runs of a tiny-model family planned in the chinchilla convention: C = f(N) D with a head cost that
    makes C_6N / C_chinchilla vary with N (as in experiments/mix98)."""
    from analysis.synthetic import chinchilla_loss

    f = lambda N: 6 * N + 12 * 4096 * np.sqrt(N / 24)  # noqa: E731
    rows = []
    for C in (1e12, 1e13, 1e14):
        for N in np.geomspace(2e3, 2e5, 7):
            D = C / f(N)
            rows.append({"name": f"C{C:.0e}-N{N:.4g}", "N": N, "D": D, "C": C, "budget": C,
                         "loss": chinchilla_loss(N, D, E=2.0, A=60.0, B=300.0, alpha=0.4, beta=0.35),
                         "C_6N": 6 * N * D, "C_kaplan": 6.3 * N * D, "C_chinchilla": C})
    return write_sweep(root, pd.DataFrame(rows), failed=0, diverged=0, convention=convention), f


def test_report_defaults_to_the_records_convention_and_queries_every_approach_at_one_C(tmp_path):
    """A sweep planned (and recorded) in the chinchilla convention: no flag, C is chinchilla everywhere, Approach 2's
    slices are the planned budgets themselves and every approach answers at the one C_query."""
    from analysis.report import write_report

    sweep, _ = family_sweep(tmp_path / "s")
    write_report(sweep, tmp_path / "rep", C=1e15, n_bootstrap=0, n_jobs=1)
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert res["conventions"]["C"] == "chinchilla" and res["C_query"] == 1e15
    assert [m["C"] for m in res["approach2"]["minima"]] == [1e12, 1e13, 1e14]
    assert res["approach3"]["C"] == 1e15 and "C_query" not in res["approach2"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "C: chinchilla" in md and md.count("at C = 1e+15 FLOPs (chinchilla)") == 3


def test_another_convention_converts_each_run_and_each_slice_through_accounting(tmp_path):
    """--c-convention 6N on a chinchilla-planned sweep: each run's C is its C_6N, and each IsoFLOP slice's C is the C_6N
    its compute-optimal run would have (budget x 6N/f(N) at the slice's N_opt); still one query C for all approaches."""
    from analysis.laws.fits import fit_approach2
    from analysis.load import load_sweep, usable
    from analysis.report import fit_all

    sweep, f = family_sweep(tmp_path / "s")
    runs = usable(load_sweep(sweep, c="6N"))
    np.testing.assert_allclose(runs["C"], 6 * runs["N"] * runs["D"], rtol=1e-12)
    np.testing.assert_allclose(runs["budget_C"], runs["budget"] * 6 * runs["N"] / f(runs["N"]), rtol=1e-12)
    minima = fit_approach2(runs).minima
    expected = minima["budget"] * 6 * minima["N_opt"] / f(minima["N_opt"])
    np.testing.assert_allclose(minima["C"], expected, rtol=0.02)  # interpolated in log N between the runs' sizes
    assert (minima["C"] < 0.5 * minima["budget"]).all()  # the head's FLOPs are not in 6N: far from the budgets
    res, _ = fit_all(load_sweep(sweep, c="6N"), approaches=(2, 3), C=1e14, n_bootstrap=0)
    assert res["conventions"]["C"] == "6N" and res["approach3"]["C"] == res["C_query"] == 1e14
    assert not any(k in res["approach2"] for k in ("C_query", "C_axis"))
    assert [m["C"] for m in res["approach2"]["minima"]] == pytest.approx(minima["C"].tolist())


def _numbers(x, key="") -> dict:
    """Every number of a JSON tree by its path (strings as they are)."""
    if isinstance(x, dict):
        return {k: v for kk, vv in x.items() for k, v in _numbers(vv, f"{key}.{kk}").items()}
    if isinstance(x, list):
        return {k: v for i, vv in enumerate(x) for k, v in _numbers(vv, f"{key}[{i}]").items()}
    return {key: x}


def test_report_on_a_collected_runs_csv_matches_the_sweep(tmp_path):
    from scaling.sweep.schedule import collect, write_csv

    sweep, _ = family_sweep(tmp_path / "s")
    write_csv(collect(sweep), tmp_path / "runs.csv")
    assert main(["report", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "csv"), "--bootstrap", "0",
                 "--at-C", "1e15"]) == 0
    assert main(["report", str(sweep), "--out", str(tmp_path / "dir"), "--bootstrap", "0", "--at-C", "1e15"]) == 0
    from_csv = json.loads((tmp_path / "csv" / "results.json").read_text())
    from_dir = json.loads((tmp_path / "dir" / "results.json").read_text())
    # Approach 1 too: it fits the runs' final losses, which a run table holds as well as the run directories
    for k in ("approach1", "approach2", "approach3", "conventions", "C_query"):  # fits agree to rounding
        a, b = _numbers(from_csv[k]), _numbers(from_dir[k])
        assert a.keys() == b.keys(), k
        for path in a:
            same = a[path] == b[path] if isinstance(b[path], str) else a[path] == pytest.approx(b[path], 1e-6, 1e-12)
            assert same, (k, path, a[path], b[path])
    md = (tmp_path / "csv" / "report.md").read_text()
    assert "Points: the final losses of" in md and "intermediate losses of a run are not runs of that length" in md
    assert "error" not in from_dir["approach1"]

"""The CLI (`python -m analysis fit|report`), the report, and the package's isolation from JAX and the trainer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.__main__ import main
from analysis.synthetic import CHINCHILLA_TRUTH as T
from analysis.synthetic import isoflop_runs, write_sweep

REPO = Path(__file__).resolve().parents[1]
TRUE_A = T["beta"] / (T["alpha"] + T["beta"])


def test_import_and_fit_do_not_load_jax_or_trainer():
    code = ("import sys, analysis.report, analysis.__main__\n"
            "from analysis.synthetic import isoflop_runs\n"
            "from analysis.report import fit_all\n"
            "res, _ = fit_all(isoflop_runs(), n_bootstrap=4, n_jobs=1)\n"
            "assert 'approach3' in res and 'error' not in res['approach3'], res\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax', 'scaling'))\n"
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
    (["--approach", "1"], "--approach 1 needs training curves"),
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
                   "N: non_embedding parameters; C: 6ND", "![contours](figures/contours.png)"):
        assert needle in md, needle
    res = json.loads((sweep / "report" / "results.json").read_text())
    assert res["n_used"] == 21 and {e["name"] for e in res["excluded"]} == {"failed-0", "diverged-0", "never-ran"}
    figs = sweep / "report" / "figures"
    assert all((figs / f"{n}.png").stat().st_size > 10_000 for n in ("isoflops", "contours", "optimal_allocation"))


def test_report_on_missing_dir_fails_cleanly(tmp_path, capsys):
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "absent").exists()


def test_approach2_on_budgets_in_another_convention_says_so_and_is_queried_in_it():
    """A sweep planned in the chinchilla convention but read with C = 6ND: Approach 2 fits against the planned budgets,
    so its N_opt is queried one decade beyond the largest budget (not the largest 6ND C) and the result says so."""
    from analysis.report import fit_all, markdown

    runs = isoflop_runs(budgets=(1e17, 1e18, 1e19), n_per_budget=7, noise=0.0)
    res, _ = fit_all(runs, approaches=(2,), n_bootstrap=0)
    assert "C_axis" not in res["approach2"] and "C_query" not in res["approach2"]  # budgets are the table's C
    planned = runs.assign(budget=runs["budget"] * 3.0)  # e.g. embedding FLOPs counted in the plan, not in 6ND
    res, _ = fit_all(planned, approaches=(2,), n_bootstrap=0, budget_convention="chinchilla")
    a2 = res["approach2"]
    assert a2["C_query"] == pytest.approx(3e20) and a2["C_axis"]["convention"] == "chinchilla"
    assert a2["C_axis"]["table_C_over_budget"] == pytest.approx([1 / 3, 1 / 3])
    assert res["C_query"] == pytest.approx(1e20)  # the other approaches keep the table's convention
    text = markdown(res, [], "t")
    assert "planned IsoFLOP budget (chinchilla convention)" in text and "C = 3e+20 (chinchilla convention)" in text

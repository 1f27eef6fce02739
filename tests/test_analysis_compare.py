"""Comparing sweeps (analysis.checks.compare): fits side by side and the effective compute multiplier with its
interval."""

import json

import numpy as np
import pytest

from analysis.__main__ import main
from analysis.checks.compare import FrontierStat, compare_sweeps, frontier_points, write_comparison
from analysis.synthetic import CHINCHILLA_TRUTH as T
from analysis.synthetic import isoflop_runs, write_sweep

BUDGETS = (1e17, 3e17, 1e18, 3e18, 1e19)


def _truth_times(m: float) -> dict:
    """The truth whose L(N, D) is the Chinchilla truth's at (sqrt(m) N, sqrt(m) D): every loss is reached with m times
    less compute, so L_B(C) = L_A(m C) on the whole frontier."""
    return T | {"A": T["A"] * m ** (-T["alpha"] / 2), "B": T["B"] * m ** (-T["beta"] / 2)}


def _pair(m: float, seed: int = 0, **kw):
    kw = dict(budgets=BUDGETS, n_per_budget=7, noise=0.005) | kw
    return isoflop_runs(seed=seed, **kw), isoflop_runs(seed=seed + 100, truth=_truth_times(m), **kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_multiplier_interval_contains_two_when_B_needs_half_the_compute(seed):
    a, b = _pair(2.0, seed)
    res, _ = compare_sweeps({"A": a, "B": b}, n_bootstrap=40, n_jobs=1, seed=seed, approaches=())
    m = res["multipliers"]["B"]
    assert m["ci95"][0] <= 2.0 <= m["ci95"][1], m
    assert m["estimate"] == pytest.approx(2.0, rel=0.1) and m["ci95"][1] / m["ci95"][0] < 1.5  # informative
    lo, hi = res["common_loss_range"]
    assert lo < res["at_loss"] < hi


def test_same_truth_gives_a_multiplier_of_one_not_two():
    a, b = _pair(1.0)
    res, _ = compare_sweeps({"A": a, "B": b}, n_bootstrap=40, n_jobs=1, approaches=())
    lo, hi = res["multipliers"]["B"]["ci95"]
    assert lo <= 1.0 <= hi and hi < 2.0


def test_frontier_inverts_to_the_compute_of_a_loss():
    a, _ = _pair(1.0)
    C, loss = frontier_points(a)
    assert len(C) == len(BUDGETS) and np.all(np.diff(loss) < 0)
    f = FrontierStat(float(loss[2]))(a)
    assert f["C_at_L"] == pytest.approx(C[2], rel=0.15)  # the fitted frontier passes near its own points
    assert (f["C_c"] / f["C_at_L"]) ** f["alpha_C"] == pytest.approx(loss[2], rel=1e-9)


def test_compare_table_shows_each_sweeps_fits_side_by_side(tmp_path):
    a, b = _pair(2.0)
    write_sweep(tmp_path / "base", a, failed=0, diverged=0, sweep="base")
    write_sweep(tmp_path / "better", b, failed=0, diverged=0, sweep="better")
    rc = main(["compare", str(tmp_path / "base"), str(tmp_path / "better"), "--out", str(tmp_path / "cmp"),
               "--bootstrap", "12", "--jobs", "1", "--approach", "2", "--at-C", "1e21"])
    assert rc == 0
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert res["sweeps"] == ["base", "better"] and res["reference"] == "base" and res["C_query"] == 1e21
    assert res["fits"]["base"]["approach2"]["a"] > 0 and "identification" in res["fits"]["better"]["approach2"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| quantity | base | better |" in md and "| Approach 2: a |" in md and "Approach 3" not in md
    row = next(line for line in md.splitlines() if line.startswith("| compute multiplier over base | 1 |"))
    est = res["multipliers"]["better"]["estimate"]
    assert f"{est:.3g}" in row and est == pytest.approx(2.0, rel=0.15)
    assert (tmp_path / "cmp" / "figures" / "compare_loss_vs_compute.png").stat().st_size > 10_000
    assert "figures/compare_loss_vs_compute.png" in md


def test_at_loss_given_is_where_the_multiplier_is_read():
    a, b = _pair(2.0)
    res, _ = compare_sweeps({"A": a, "B": b}, at_loss=3.2, n_bootstrap=0, approaches=())
    assert res["at_loss"] == 3.2 and "ci95" not in res["multipliers"]["B"]
    assert res["frontiers"]["A"]["C_at_L"] > res["frontiers"]["B"]["C_at_L"]


def test_compare_errors_are_clear(tmp_path, capsys):
    a, b = _pair(2.0)
    with pytest.raises(ValueError, match="1 sweep\\(s\\) given; give at least 2"):
        compare_sweeps({"A": a})
    with pytest.raises(ValueError, match="at_loss=-1"):
        compare_sweeps({"A": a, "B": b}, at_loss=-1.0)
    with pytest.raises(ValueError, match="sweep 'B' has no usable runs"):
        compare_sweeps({"A": a, "B": b.assign(excluded=True, reason="status failed")})
    with pytest.raises(ValueError, match="different FLOP conventions.*--c-convention"):
        compare_sweeps({"A": a, "B": b.assign(C_convention="chinchilla")})
    far = isoflop_runs(budgets=(1e22, 1e23, 1e24), n_per_budget=7, noise=0.005)  # losses far below A's
    with pytest.raises(ValueError, match="do not overlap.*give --at-loss"):
        compare_sweeps({"A": isoflop_runs(budgets=(1e15, 1e16, 1e17), n_per_budget=7), "B": far}, n_bootstrap=0)
    with pytest.raises(ValueError, match="2 names for 3 sweeps"):
        write_comparison([tmp_path, tmp_path, tmp_path], tmp_path / "o", names=["x", "y"])
    with pytest.raises(ValueError, match="names \\['x', 'x'\\] repeat"):
        write_comparison([tmp_path, tmp_path], tmp_path / "o", names=["x", "x"])
    assert main(["compare", str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "nope does not exist; give sweep directories or their runs.csv" in capsys.readouterr().err

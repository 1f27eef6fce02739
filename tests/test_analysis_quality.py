"""Honest intervals (analysis.checks.identify) and IsoFLOP quality flags (analysis.checks.quality)."""

import re

import numpy as np
import pandas as pd
import pytest

from analysis.checks.identify import RULES, describe, identification, interval_problem, mark_identification
from analysis.checks.quality import QualityRules, isoflop_quality, quality_markdown
from analysis.checks.uncertainty import Approach2Stat, Approach3Stat, bootstrap
from analysis.report import plots
from analysis.report.build import _table, fit_all, markdown
from analysis.synthetic import CHINCHILLA_TRUTH as T
from analysis.synthetic import chinchilla_loss, isoflop_runs


# --------------------------------------------------------------------------------------------------------------------
# Not identified
# --------------------------------------------------------------------------------------------------------------------
def _grid(N_lo, N_hi, seed=0, noise=0.01) -> pd.DataFrame:
    """A size x tokens grid (4 sizes x 6 token counts) from the Chinchilla truth: alpha is learnt from the N range."""
    rng = np.random.default_rng(seed)
    rows = [{"name": f"N{N:.3g}-D{D:.3g}", "N": N, "D": D, "C": 6 * N * D,
             "loss": chinchilla_loss(N, D, **T) * np.exp(noise * rng.standard_normal())}
            for N in np.geomspace(N_lo, N_hi, 4) for D in np.geomspace(1e9, 1e11, 6)]
    return pd.DataFrame(rows)


def _vpnls_bootstrap(runs) -> dict:
    full = Approach3Stat(method="vpnls").fit(runs)
    stat = Approach3Stat(C=1e21, method="vpnls", init=(full.E, full.A, full.B, full.alpha, full.beta))
    return mark_identification(bootstrap(runs, stat, n_resamples=40, n_jobs=1).as_dict(), stat)


def test_alpha_identified_when_N_spans_three_decades():
    d = _vpnls_bootstrap(_grid(1e7, 1e10))
    ident = d["identification"]
    assert all(ident[k]["identified"] for k in ("E", "A", "B", "alpha", "beta", "a", "N_opt")), ident
    lo, hi = d["ci95"]["alpha"]
    assert lo <= T["alpha"] <= hi and hi - lo < 0.2  # numbers kept, and they are a real uncertainty
    assert ident["N_opt"]["depends_on"] == []


def test_alpha_not_identified_when_N_range_is_too_narrow():
    d = _vpnls_bootstrap(_grid(1e8, 1.3e8))  # a 30% range of N: A/N^alpha is nearly a constant, merged into E
    ident = d["identification"]
    assert not ident["alpha"]["identified"] and "alpha" in ident["alpha"]["reason"]
    assert d["ci95"]["alpha"] is None  # no numbers where the data do not pin the parameter down
    assert not ident["A"]["identified"] and "decades" in ident["A"]["reason"]
    # beta is still learnt from the wide D range; the derived N_opt says what it rests on.
    assert ident["beta"]["identified"] and d["ci95"]["beta"][0] <= T["beta"] <= d["ci95"]["beta"][1]
    assert "alpha" in ident["N_opt"]["depends_on"] or not ident["N_opt"]["identified"]
    assert describe("alpha", ident).startswith("not identified (")


@pytest.mark.parametrize("key, lo, hi, est, ref, match", [
    ("A", 25.68, 2.037e+132, 400.0, None, "spans 130.9 decades.*upper end running off.*A >= 25.68"),
    ("alpha", 0.5693, 34.3, 0.6, None, "wider than the plausible range 0 <= alpha <= 2"),
    ("E", 0.0, 2.28, 1.9, None, "reaches the bound E = 0.*E <= 2.28"),
    ("E", 2.17e-4, 2.18e-4, 2.17e-4, 2.5, "puts E = 0.000217 on its bound 0"),  # stuck at the bound, not certain
    ("E", 1.2e-8, 4.7, 3.9, None, "lower end running towards E = 0"),
    ("alpha", 0.003, 0.26, 0.07, None, "runs into the bound alpha = 0"),
    ("k_N", 7e-9, 286.0, 1e-3, None, "N_opt at C = 1 FLOP"),
])
def test_interval_problem_names_the_reason(key, lo, hi, est, ref, match):
    reason = interval_problem(key, lo, hi, RULES[key], est, ref)
    assert reason is not None
    assert re.search(match, reason), reason


@pytest.mark.parametrize("key, lo, hi", [("A", 300.0, 600.0), ("alpha", 0.3, 0.4), ("N_opt", 1e8, 5e9),
                                         ("a", 0.3, 1.1)])
def test_interval_problem_passes_bounded_intervals(key, lo, hi):
    assert interval_problem(key, lo, hi, RULES[key], (lo + hi) / 2, 2.0) is None


def test_a_fit_on_the_vpnls_box_wall_is_not_identified_however_narrow():
    vpnls, huber = Approach3Stat(method="vpnls"), Approach3Stat()
    ci = {"alpha": [2.999, 3.0], "beta": [0.25, 0.31]}
    assert "runs into the bound alpha = 3" in identification(vpnls, ci, 40, 0)["alpha"]["reason"]
    assert "lies outside the plausible range" in identification(huber, ci, 40, 0)["alpha"]["reason"]
    assert identification(vpnls, ci, 40, 0)["beta"]["identified"]


def test_approach3_exponents_a_b_run_into_their_structural_bounds():
    ci = {"a": [0.0085, 0.63], "b": [0.37, 0.9915], "alpha": [0.46, 20.5], "beta": [0.1, 1.3]}
    ident = identification(Approach3Stat(), ci, 40, 0)
    assert "bound a = 0" in ident["a"]["reason"] and "bound b = 1" in ident["b"]["reason"]
    assert ident["a"]["depends_on"] == ["alpha"]
    # For Approach 2, a is a free slope: the same interval is only judged by its width.
    assert identification(Approach2Stat(), {"a": [0.0085, 0.63]}, 40, 0)["a"]["identified"]


def test_many_failed_resamples_make_the_whole_fit_not_identified():
    ident = identification(Approach2Stat(), {"a": [0.45, 0.5], "N_opt": [1e8, 2e8]}, 30, 20)
    assert not ident["a"]["identified"] and "20 of 50 resampled fits failed" in ident["a"]["reason"]
    assert identification(Approach2Stat(), {"a": [0.45, 0.5]}, 45, 5)["a"]["identified"]


def test_markdown_table_prints_the_reason_not_the_numbers():
    d = {"A": 6.16e4, "beta": 0.45, "N_opt": 5376.0,
         "ci95": {"A": None, "beta": [0.1, 1.3], "N_opt": [1180.0, 5.85e4]},
         "identification": {"A": {"identified": False, "reason": "the 95% interval [14.7, 5.2e+263] spans 262.5 "
                                                                 "decades (more than 3)", "depends_on": []},
                            "beta": {"identified": True, "reason": None, "depends_on": []},
                            "N_opt": {"identified": True, "reason": None, "depends_on": ["A"]}}}
    rows = "\n".join(_table(d, ["A", "beta", "N_opt"]))
    assert "| A | not identified | the 95% interval [14.7, 5.2e+263] spans 262.5 decades (more than 3) |" in rows
    assert "6.16e+04" not in rows  # the estimate of a not-identified parameter is not printed either
    assert "| beta | 0.45 | [0.1, 1.3] |" in rows
    assert "| N_opt | 5376 | [1180, 5.85e+04] (depends on not-identified A) |" in rows


def test_fit_all_writes_identification_to_the_json():
    res, _ = fit_all(isoflop_runs(noise=0.005, n_per_budget=7), approaches=(2,), n_bootstrap=12, n_jobs=1)
    a2 = res["approach2"]
    assert set(a2["identification"]) == {"a", "b", "k_N", "k_D", "N_opt", "D_opt"}
    assert a2["identification"]["a"] == {"identified": True, "reason": None, "depends_on": []}
    for k, i in a2["identification"].items():  # numbers exactly where identified
        assert (a2["ci95"][k] is not None) == i["identified"], k


# --------------------------------------------------------------------------------------------------------------------
# IsoFLOP quality flags
# --------------------------------------------------------------------------------------------------------------------
BUDGETS = (1e17, 3e17, 1e18, 3e18, 1e19)


def _runs(**kw) -> pd.DataFrame:
    return isoflop_runs(budgets=BUDGETS, n_per_budget=9, noise=0.005, seed=2, **kw)


def test_clean_isoflop_grid_raises_no_flag():
    q = isoflop_quality(_runs())
    assert q.budgets["flags"].eq("").all(), q.budgets
    assert q.flagged.empty and np.isfinite(q.points["spline_z"]).sum() == 5 * 7  # interior runs were checked
    assert not q.budgets["off_centre"].any() and not q.budgets["weak_curvature"].any()


def test_each_flag_fires_on_the_defect_it_names():
    runs = _runs()
    by_budget = {b: g.sort_values("N").index.to_list() for b, g in runs.groupby("budget")}
    outlier = by_budget[1e18][4]  # an interior run 8% too high
    runs.loc[outlier, "loss"] *= 1.08
    dup = runs.loc[by_budget[3e17][3]].copy()  # a second size 2% from an existing one
    dup["name"], dup["N"] = "dup", dup["N"] * 1.02
    dup["D"] = dup["C"] / (6 * dup["N"])
    # Budget 3e18 sampled only on the small side: its minimum sits at the largest sizes.
    runs = runs[~runs.index.isin(by_budget[3e18][5:])]
    # Budget 1e19 made flat and noisy: no curvature the data support.
    flat = runs["budget"] == 1e19
    runs.loc[flat, "loss"] = 2.5 * np.exp(0.01 * np.random.default_rng(1).standard_normal(flat.sum()))
    q = isoflop_quality(pd.concat([runs, dup.to_frame().T.astype(runs.dtypes.to_dict())], ignore_index=True))
    flags = dict(zip(q.budgets["budget"], q.budgets["flags"]))
    assert "spline_outlier" in flags[1e18] and "near_duplicate" in flags[3e17]
    assert "off_centre" in flags[3e18] and "weak_curvature" in flags[1e19]
    assert flags[1e17] == ""
    pts = q.flagged.set_index("name")
    assert "spline_outlier" in pts.loc[runs.loc[outlier, "name"], "flags"]
    assert "robust sigmas" in pts.loc[runs.loc[outlier, "name"], "detail"]
    assert pts.loc["dup", "flags"] == "near_duplicate" and "differ by 2.0%" in pts.loc["dup", "detail"]
    assert set(pts.index) == {runs.loc[outlier, "name"], "dup", runs.loc[by_budget[3e17][3], "name"]}


def test_few_sizes_skip_the_spline_check_and_say_so():
    q = isoflop_quality(isoflop_runs(budgets=(1e17, 1e18, 1e19), n_per_budget=5, noise=0.01))
    assert q.flagged.empty and "spline check skipped: 9 interior runs" in q.note
    three = isoflop_quality(isoflop_runs(budgets=(1e17, 1e18), n_per_budget=3))
    assert three.budgets["note"].str.contains("curvature untested").all()


def test_quality_errors_are_clear():
    runs = _runs()
    with pytest.raises(ValueError, match="no planned budget"):
        isoflop_quality(runs.drop(columns=["budget"]))
    with pytest.raises(ValueError, match=r"lacks columns \['loss'\]"):
        isoflop_quality(runs.drop(columns=["loss"]))
    with pytest.raises(ValueError, match=r"near_duplicate=1.5: .*0.03 for 3%"):
        QualityRules(near_duplicate=1.5)
    with pytest.raises(ValueError, match="spline_k=0"):
        QualityRules(spline_k=0)


def test_report_has_the_flags_table_and_the_figure_marks_flagged_runs(tmp_path, monkeypatch):
    runs = _runs()
    i = runs[runs["budget"] == 1e18].sort_values("N").index[4]
    runs.loc[i, "loss"] *= 1.08
    res, fitted = fit_all(runs, approaches=(2,), n_bootstrap=0)
    q = res["isoflop_quality"]
    assert [p["name"] for p in q["flagged_points"]] == [runs.loc[i, "name"]]
    md = markdown(res | {"excluded": [], "conventions": res["conventions"]}, [], "t")
    assert "## IsoFLOP quality flags" in md and f"| {runs.loc[i, 'name']} | 1e+18 |" in md
    assert "| 1e+18 | 9 | 9 |" in md and "spline_outlier |" in md
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, out, name: drawn.setdefault(name, fig) and [])
    from analysis.report import make_plots
    make_plots(runs, fitted, res, tmp_path)
    labels = [t.get_text() for t in drawn["isoflops"].axes[0].get_legend().get_texts()]
    assert any(t.startswith("QC flag") for t in labels)
    assert [t for t in labels if t.startswith("C=1.0e+18")][0].endswith("spline outlier)")  # the budget says why


def test_quality_markdown_without_flags_and_with_an_error():
    assert quality_markdown(None) == []
    assert "Not checked: boom" in "\n".join(quality_markdown({"error": "boom"}))
    md = "\n".join(quality_markdown(isoflop_quality(_runs()).as_dict()))
    assert "No run is a spline outlier or a near-duplicate size." in md and md.count("| none |") == 5

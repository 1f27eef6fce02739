"""Predict-then-verify (analysis.checks.predict): the family's token cost, the constrained optimum, the CLI round
trip."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis.__main__ import main
from analysis.checks.predict import (TokenCost, backtest_approaches, constrained_optimum, predict, prediction_markdown,
                                     verification_markdown, verify)
from analysis.synthetic import CHINCHILLA_TRUTH, chinchilla_loss, write_sweep

V = 4096
TRUTH = {"E": 2.0, "A": 60.0, "B": 300.0, "alpha": 0.4, "beta": 0.35}


def flops_per_token(N):
    """A tiny-model family: body 6N plus a tied head of width d = sqrt(N / 24) (2-layer blocks, 12 d^2 each)."""
    N = np.asarray(N, float)
    return 6 * N + 12 * V * np.sqrt(N / 24)


def family_runs(budgets, noise=0.0, seed=0, n=7):
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        cost = TokenCost(tuple(np.log([1e2, 1e8])), tuple(np.log(flops_per_token([1e2, 1e8]))))
        N_true = constrained_optimum(lambda N, D: chinchilla_loss(N, D, **TRUTH), C, cost, (1e2, 1e8))[0]
        for N in N_true * 1.6 ** (np.arange(n) - n // 2):
            D = C / flops_per_token(N)
            loss = chinchilla_loss(N, D, **TRUTH) * math.exp(noise * rng.standard_normal())
            rows.append({"name": f"C{C:.0e}-N{N:.4g}", "N": N, "D": D, "C": C, "budget": C, "loss": loss})
    return pd.DataFrame(rows)


def true_optimum(C):
    grid = np.exp(np.linspace(np.log(1e2), np.log(1e8), 200001))
    L = chinchilla_loss(grid, C / flops_per_token(grid), **TRUTH)
    i = int(np.argmin(L))
    return grid[i], C / flops_per_token(grid[i]), L[i]


def test_token_cost_interpolates_and_extends_in_log_log():
    N = np.array([1e3, 1e4, 1e5])
    cost = TokenCost.from_runs(pd.DataFrame({"N": np.repeat(N, 2), "D": 1e6, "C": np.repeat(flops_per_token(N), 2) * 1e6}))
    np.testing.assert_allclose(cost(N), flops_per_token(N), rtol=1e-12)
    # Beyond the ends: the end segments' log-log slope continues.
    slope = np.log(flops_per_token(1e5) / flops_per_token(1e4)) / np.log(10)
    np.testing.assert_allclose(cost(1e6), flops_per_token(1e5) * 10 ** slope, rtol=1e-12)
    np.testing.assert_allclose(cost.D(1e4, 3e12), 3e12 / flops_per_token(1e4), rtol=1e-12)


def test_token_cost_needs_two_sizes():
    with pytest.raises(ValueError, match="1 distinct model size"):
        TokenCost.from_runs(pd.DataFrame({"N": [1e3, 1e3], "D": [1e6, 2e6], "C": [1e12, 2e12]}))


def test_constrained_optimum_matches_brute_force_and_refuses_an_edge():
    cost = TokenCost(tuple(np.log([1e2, 1e8])), tuple(np.log(flops_per_token([1e2, 1e8]))))
    fine = TokenCost(tuple(np.log(np.logspace(2, 8, 2000))), tuple(np.log(flops_per_token(np.logspace(2, 8, 2000)))))
    N, D, L = constrained_optimum(lambda N, D: chinchilla_loss(N, D, **TRUTH), 1e14, fine, (1e2, 1e8))
    N_t, D_t, L_t = true_optimum(1e14)
    assert abs(N / N_t - 1) < 2e-3 and abs(D / D_t - 1) < 2e-3 and abs(L / L_t - 1) < 1e-6
    with pytest.raises(ValueError, match="edge of the searched range"):
        constrained_optimum(lambda N, D: 1.0 / N, 1e14, cost, (1e2, 1e8))  # loss falls forever in N


def test_predict_recovers_the_true_optimum_4x_beyond_the_fitted_budgets():
    runs = family_runs([5e11, 1.5e12, 5e12, 1.5e13], noise=0.002)
    p = predict(runs, 6e13, n_bootstrap=40, n_jobs=1)
    N_t, D_t, L_t = true_optimum(6e13)
    est = p["estimates"]
    # Approach 3's form is the truth's: the optimum on the family's budget line comes back closely.
    assert abs(p["prediction"]["N_opt"] / N_t - 1) < 0.15
    assert abs(p["prediction"]["L_opt"] / L_t - 1) < 0.005
    lo, hi = p["prediction_ci95"]["L_opt"]
    assert lo <= p["prediction"]["L_opt"] <= hi
    # Approach 2 fits a power law in C to the parabola minima: close, not exact, with a non-6ND family.
    assert abs(est["approach2.N_opt"] / N_t - 1) < 0.35
    assert abs(est["approach2.L_opt"] / L_t - 1) < 0.02
    assert p["C_over_largest_budget"] == pytest.approx(4.0)
    G, a = p["prior_fit"]
    assert G * 6e13 ** a == pytest.approx(p["prediction"]["N_opt"])
    # prior_fit is in the prediction's N: the planner is told which (plan.n_convention) when it is not its default
    assert "plan.n_convention" not in prediction_markdown(p)
    assert "`plan.n_convention=total` (the fit's N)" in prediction_markdown({**p, "conventions": {"N": "total"}})


def test_predict_rejects_bad_arguments():
    runs = family_runs([5e11, 5e12])
    with pytest.raises(ValueError, match="headline='approach9' is unknown"):
        predict(runs, 1e13, headline="approach9", n_bootstrap=2, n_jobs=1)
    with pytest.raises(ValueError, match="must be positive"):
        predict(runs, -1.0, n_bootstrap=2, n_jobs=1)


def test_verify_scores_the_runs_against_the_committed_prediction():
    runs = family_runs([5e11, 1.5e12, 5e12, 1.5e13])
    p = predict(runs, 6e13, n_bootstrap=10, n_jobs=1)
    N_p = p["prediction"]["N_opt"]
    sizes = np.array([0.5, 1.0, 2.0]) * N_p
    at = pd.DataFrame({"name": ["half", "pred", "double"], "N": sizes, "D": 6e13 / flops_per_token(sizes), "C": 6e13,
                       "loss": chinchilla_loss(sizes, 6e13 / flops_per_token(sizes), **TRUTH)})
    v = verify(p, at)
    assert v["best"]["name"] == "pred" and v["best_is_nearest_predicted_N"]
    assert abs(v["rel_error_L_opt"]) < 0.005
    assert [r["name"] for r in v["runs"]] == ["half", "pred", "double"]
    assert max(abs(r["rel_error_approach3"]) for r in v["runs"]) < 0.005
    # seed replicates are one size, scored by their mean: a lucky seed of a worse size does not win
    gap = float(at["loss"].iloc[2] - at["loss"].iloc[1])  # double is worse than pred by this much
    lucky = gap + 0.05  # double's seed 1 beats every other run, its seed 0 makes its mean the worse
    reps = pd.concat([at.assign(name=at["name"] + "-s0", loss=at["loss"] + [0.0, 0.02, lucky + 0.05]),
                      at.assign(name=at["name"] + "-s1", loss=at["loss"] + [0.0, -0.01, -lucky])], ignore_index=True)
    w = verify(p, reps)
    assert [z["name"] for z in w["sizes"]] == ["half", "pred", "double"] and {z["n_seeds"] for z in w["sizes"]} == {2}
    truth = dict(zip(at["name"], at["loss"]))
    assert w["sizes"][1]["loss"] == pytest.approx(truth["pred"] + 0.005)
    assert w["sizes"][1]["loss_std"] == pytest.approx(np.std([0.02, -0.01], ddof=1))
    assert w["best"]["name"] == "pred" and w["best"]["n_seeds"] == 2
    assert w["rel_error_L_opt"] == pytest.approx((p["prediction"]["L_opt"] - w["best"]["loss"]) / w["best"]["loss"])
    assert min(reps["loss"]) == reps.loc[reps["name"] == "double-s1", "loss"].iloc[0]  # the single best run is not it
    md = verification_markdown(w)
    assert "vs the best size (seed mean)" in md and "| pred | 1.00 | 2 |" in md
    with pytest.raises(ValueError, match="not at the predicted budget"):
        verify(p, at.assign(C=1e13))
    with pytest.raises(ValueError, match="no usable runs"):
        verify(p, at.iloc[:0])


def test_cli_predict_then_verify_round_trip(tmp_path, capsys):
    runs = family_runs([5e11, 1.5e12, 5e12, 1.5e13], noise=0.002)
    write_sweep(tmp_path / "fit", runs, failed=0, diverged=0)
    out = tmp_path / "study"
    assert main(["predict", str(tmp_path / "fit"), "--at-C", "6e13", "--out", str(out), "--bootstrap", "10",
                 "--jobs", "1"]) == 0
    p = json.loads((out / "prediction.json").read_text())
    assert "Committed: N_opt" in (out / "prediction.md").read_text()
    sizes = np.array([0.5, 1.0, 2.0]) * p["prediction"]["N_opt"]
    ver = pd.DataFrame({"name": ["v-half", "v-pred", "v-double"], "N": sizes, "D": 6e13 / flops_per_token(sizes),
                        "C": 6e13, "budget": 6e13,
                        "loss": chinchilla_loss(sizes, 6e13 / flops_per_token(sizes), **TRUTH)})
    write_sweep(tmp_path / "verify", ver, failed=0, diverged=0)
    assert main(["verify", str(out / "prediction.json"), str(tmp_path / "verify"), "--out", str(out)]) == 0
    v = json.loads((out / "verification.json").read_text())
    assert abs(v["rel_error_L_opt"]) < 0.01
    assert "Relative error of the predicted loss" in (out / "verification.md").read_text()
    assert (out / "figures" / "verification.png").stat().st_size > 10_000
    # A missing prediction file is one clear error, not a traceback.
    assert main(["verify", str(tmp_path / "nope.json"), str(tmp_path / "verify"), "--out", str(out)]) == 2
    assert "cannot read the prediction" in capsys.readouterr().err


def test_cli_predict_and_verify_read_a_collected_runs_csv_as_the_sweep(tmp_path, capsys):
    """A study commits runs.csv, not its run directories: predicting and verifying from it give the same numbers."""
    from scaling.sweep.schedule import collect, write_csv

    write_sweep(tmp_path / "fit", family_runs([5e11, 1.5e12, 5e12, 1.5e13], noise=0.002), failed=0, diverged=0)
    write_csv(collect(tmp_path / "fit"), tmp_path / "runs.csv")
    for src, out in ((tmp_path / "fit", "dir"), (tmp_path / "runs.csv", "csv")):
        assert main(["predict", str(src), "--at-C", "6e13", "--out", str(tmp_path / out), "--bootstrap", "10",
                     "--jobs", "1", "--l-form", "local"]) == 0
    by_dir, by_csv = (json.loads((tmp_path / o / "prediction.json").read_text()) for o in ("dir", "csv"))
    assert by_csv["l_form"] == "local" and by_csv["backtest_horizons"]
    for k in ("prediction", "estimates"):
        assert by_csv[k] == pytest.approx(by_dir[k], rel=1e-9), k
    for k, ci in by_dir["prediction_ci95"].items():
        assert by_csv["prediction_ci95"][k] == pytest.approx(ci, rel=1e-9), k
    sizes = np.array([0.5, 1.0, 2.0]) * by_dir["prediction"]["N_opt"]
    ver = pd.DataFrame({"name": ["v-half", "v-pred", "v-double"], "N": sizes, "D": 6e13 / flops_per_token(sizes),
                        "C": 6e13, "budget": 6e13,
                        "loss": chinchilla_loss(sizes, 6e13 / flops_per_token(sizes), **TRUTH)})
    write_sweep(tmp_path / "verify", ver, failed=0, diverged=0)
    write_csv(collect(tmp_path / "verify"), tmp_path / "verify_runs.csv")
    for src, out in ((tmp_path / "verify", "dir"), (tmp_path / "verify_runs.csv", "csv")):
        assert main(["verify", str(tmp_path / "dir" / "prediction.json"), str(src), "--out", str(tmp_path / out)]) == 0
    v_dir, v_csv = (json.loads((tmp_path / o / "verification.json").read_text()) for o in ("dir", "csv"))
    assert v_csv["rel_error_L_opt"] == pytest.approx(v_dir["rel_error_L_opt"], rel=1e-12)
    capsys.readouterr()
    # A run table has no records to skip or check: asking for that is one clear error.
    assert main(["predict", str(tmp_path / "runs.csv"), "--at-C", "6e13", "--out", str(tmp_path / "x"),
                 "--skip-corrupt"]) == 2
    assert "read run records: give the sweep directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_local_exponent_is_the_slope_of_the_constrained_optimum():
    # 9 sizes per budget: the runs' N reach past the optimum at 2C, so f(N) is interpolated, not extended.
    runs = family_runs([5e11, 1.5e12, 5e12, 1.5e13], n=9)
    p = predict(runs, 6e13, n_bootstrap=4, n_jobs=1)
    slope = math.log(true_optimum(1.2e14)[0] / true_optimum(3e13)[0]) / math.log(4)
    assert p["estimates"]["approach3.a_local"] == pytest.approx(slope, rel=0.05)
    # The family's head makes N_opt grow faster than eq. 4's beta / (alpha + beta) = 0.467 for this truth.
    assert slope > TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])


def test_report_puts_approach3_optimum_on_the_budget_line_when_k_varies(tmp_path):
    from analysis.report import write_report

    runs = family_runs([5e11, 1.5e12, 5e12, 1.5e13], noise=0.002)
    write_sweep(tmp_path / "fit", runs, failed=0, diverged=0, convention="chinchilla")
    write_report(tmp_path / "fit", tmp_path / "rep", C=6e13, n_bootstrap=8, n_jobs=1)  # the records' chinchilla C
    a3 = json.loads((tmp_path / "rep" / "results.json").read_text())["approach3"]
    assert "family budget line" in a3["allocation"]
    p = predict(runs, 6e13, n_bootstrap=2, n_jobs=1)
    assert a3["N_opt"] == pytest.approx(p["estimates"]["approach3.N_opt"], rel=1e-3)
    assert a3["L_opt"] == pytest.approx(p["estimates"]["approach3.L_opt"], rel=1e-6)
    assert "on the family budget line" in (tmp_path / "rep" / "report.md").read_text()
    # In the 6ND convention one k describes every run: eq. 4's closed form, no note.
    write_report(tmp_path / "fit", tmp_path / "rep6", c="6ND", C=6e13, n_bootstrap=4, n_jobs=1)
    assert "allocation" not in json.loads((tmp_path / "rep6" / "results.json").read_text())["approach3"]


def test_backtest_scores_each_approach_on_the_largest_budget_and_auto_picks_the_better():
    runs = family_runs([5e11, 1.5e12, 5e12, 1.5e13], noise=0.002)
    p = predict(runs, 6e13, n_bootstrap=4, n_jobs=1)
    bt = p["backtest"]
    assert bt["C"] == 1.5e13 and bt["fitted_budgets"] == [5e11, 1.5e12, 5e12]
    for k in ("approach2", "approach3"):
        assert bt[k]["rel_error_L"] == pytest.approx(bt[k]["L_opt"] / bt["observed"]["L_opt"] - 1)
    best = min(("approach2", "approach3"), key=lambda k: abs(bt[k]["rel_error_L"]))
    assert p["headline"] == best
    assert p["prediction"]["L_opt"] == p["estimates"][f"{best}.L_opt"]
    # Two budgets leave nothing to score: auto refuses with the fix, an explicit headline still predicts.
    two = family_runs([5e11, 5e12])
    with pytest.raises(ValueError, match="--headline auto: no approach could be backtested"):
        predict(two, 2e13, n_bootstrap=2, n_jobs=1)
    assert "error" in predict(two, 2e13, headline="approach3", n_bootstrap=2, n_jobs=1)["backtest"]


def test_l_form_average_predicts_the_mean_of_the_two_forms_and_joins_their_intervals(tmp_path):
    runs = family_runs([5e11, 1.5e12, 5e12, 1.5e13], noise=0.002)
    irr = predict(runs, 1.5e14, headline="approach2", n_bootstrap=12, n_jobs=1)
    avg = predict(runs, 1.5e14, headline="approach2", n_bootstrap=12, n_jobs=1, l_form="average")
    pure = predict(runs, 1.5e14, headline="approach2", n_bootstrap=12, n_jobs=1, l_form="pure")
    e = avg["estimates"]
    L_irr, L_pure = e["approach2.L_opt_irreducible"], e["approach2.L_opt_pure"]
    # The truth has a floor (E = 2): the pure power law bends below it at 10x, so the forms part measurably.
    assert L_pure < L_irr - 0.01
    assert irr["prediction"]["L_opt"] == pytest.approx(L_irr) and pure["prediction"]["L_opt"] == pytest.approx(L_pure)
    assert avg["prediction"]["L_opt"] == pytest.approx((L_irr + L_pure) / 2)
    lo, hi = avg["prediction_ci95"]["L_opt"]
    ci = avg["ci95"]
    assert lo == min(ci["approach2.L_opt_irreducible"][0], ci["approach2.L_opt_pure"][0])
    assert hi == max(ci["approach2.L_opt_irreducible"][1], ci["approach2.L_opt_pure"][1])
    assert lo <= L_pure and L_irr <= hi  # both forms' own estimates lie inside the joined interval
    assert avg["l_form"] == "average" and irr["l_form"] == "irreducible"
    # N_opt does not depend on the L form; the backtest scores both forms whichever one is the headline
    assert avg["prediction"]["N_opt"] == pytest.approx(irr["prediction"]["N_opt"])
    by_form = avg["backtest"]["approach2"]["rel_error_L_by_form"]
    assert set(by_form) == {"irreducible", "pure", "local"}
    assert by_form["irreducible"] == pytest.approx(irr["backtest"]["approach2"]["rel_error_L"])
    md = prediction_markdown(avg)
    assert "the mean of the irreducible and pure forms, its interval joining theirs" in md
    assert "L_opt(C) through the IsoFLOP minima: irreducible" in md
    # local: the line in log C through the two largest budgets' IsoFLOP minima, continued to C
    from analysis.laws.fits import fit_approach2
    m = fit_approach2(runs).minima.sort_values("C")
    (C1, C2), (L1, L2) = m["C"].to_numpy()[-2:], m["loss_opt"].to_numpy()[-2:]
    local = predict(runs, 1.5e14, headline="approach2", n_bootstrap=4, n_jobs=1, l_form="local")
    assert local["prediction"]["L_opt"] == pytest.approx(L2 + (L2 - L1) * math.log(1.5e14 / C2) / math.log(C2 / C1))
    assert local["prediction"]["L_opt"] == pytest.approx(e["approach2.L_opt_local"])
    assert "(a line in log C through the minima of the top doubling of budgets)" in md
    with pytest.raises(ValueError, match="l_form='floor' is unknown"):
        predict(runs, 1.5e14, n_bootstrap=2, n_jobs=1, l_form="floor")
    # the CLI passes it through
    write_sweep(tmp_path / "fit", runs, failed=0, diverged=0)
    assert main(["predict", str(tmp_path / "fit"), "--at-C", "1.5e14", "--out", str(tmp_path / "p"), "--bootstrap",
                 "4", "--jobs", "1", "--headline", "approach2", "--l-form", "average"]) == 0
    assert json.loads((tmp_path / "p" / "prediction.json").read_text())["l_form"] == "average"


def test_local_form_is_the_least_squares_line_through_the_top_doubling_of_budgets():
    from analysis.checks.predict import local_line

    # budgets sqrt(2) apart: the top doubling holds three minima; the middle one moves the line, the lower ones do not
    C = np.array([1e11, 2e11, 4e11, 5.66e11, 8e11])
    L = np.array([6.0, 5.8, 5.5, 5.45, 5.3])
    slope, icpt = np.polyfit(np.log(C[2:]), L[2:], 1)
    assert local_line(C, L, 8e12) == pytest.approx(icpt + slope * math.log(8e12))
    assert local_line(C, np.r_[9.0, 1.0, L[2:]], 8e12) == pytest.approx(local_line(C, L, 8e12))
    assert local_line(C, np.r_[L[:3], 5.40, L[4]], 8e12) != pytest.approx(local_line(C, L, 8e12))
    # 2x apart (an achieved C a little over 2x still counts) or 3x apart: the two largest, as before
    for Cs in ([1e11, 2e11, 4.04e11], [1e11, 3e11, 9e11]):
        C2 = np.array(Cs)
        L2 = np.array([6.0, 5.7, 5.5])
        want = L2[2] + (L2[2] - L2[1]) * math.log(9e12 / C2[2]) / math.log(C2[2] / C2[1])
        assert local_line(C2, L2, 9e12) == pytest.approx(want)


def test_backtest_at_every_horizon_the_budgets_allow():
    runs = family_runs([5e11, 1e12, 2e12, 4e12, 8e12], noise=0.002)
    p = predict(runs, 8e13, headline="approach2", n_bootstrap=4, n_jobs=1)
    hz = p["backtest_horizons"]
    # hold out 1 and 2 of the largest budgets while 3 remain to fit; each scores the largest budget's minimum
    assert [b["fitted_budgets"] for b in hz] == [[5e11, 1e12, 2e12, 4e12], [5e11, 1e12, 2e12]]
    assert [b["horizon"] for b in hz] == pytest.approx([2.0, 4.0])
    assert {b["C"] for b in hz} == {8e12} and hz[0]["observed"] == p["backtest"]["observed"]
    assert hz[0]["approach2"]["rel_error_L"] == pytest.approx(p["backtest"]["approach2"]["rel_error_L"])
    for b in hz:  # the truth is Approach 3's form: its optimum comes back at every horizon
        assert abs(b["approach3"]["rel_error_L"]) < 0.01, b
    md = prediction_markdown(p)
    assert "The same backtest at longer horizons (the prediction extrapolates 10x" in md
    assert "| 4x | 3 (5e+11 to 2e+12)" in md
    with pytest.raises(ValueError, match="need at least 2 to fit"):
        backtest_approaches(runs, TokenCost.from_runs(runs), (1e3, 1e9), n_held=4)


def test_an_unbracketed_largest_budget_leaves_no_backtest_and_still_predicts_with_a_named_headline():
    runs = family_runs([5e11, 1e12, 2e12, 4e12, 8e12])
    top = runs[runs["budget"] == 8e12].nsmallest(3, "N")  # its three smallest sizes: the loss falls to the edge
    runs = pd.concat([runs[runs["budget"] < 8e12], top], ignore_index=True)
    p = predict(runs, 8e13, headline="approach2", n_bootstrap=2, n_jobs=1)
    assert "error" in p["backtest"] and p["backtest_horizons"] == []
    assert p["prediction"]["L_opt"] > 0

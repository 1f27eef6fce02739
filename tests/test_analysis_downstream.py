"""Downstream scaling (analysis.laws.downstream): the step-2 sigmoid, the two-step prediction, its backtest, the
report's Downstream section and the CLI, on synthetic evaluated runs whose accuracy is a known sigmoid of a known loss
law."""

import functools
import json

import numpy as np
import pandas as pd
import pytest

from analysis.__main__ import main
from analysis.laws import downstream as ds
from analysis.laws.approach3 import Approach3Fit
from analysis.load import load_runs_csv, load_sweep
from analysis.report import build as report
from analysis.synthetic import (SIGMOID_TRUTH, TASK_LOSS, TINY_TRUTH, downstream_runs, eval_record, write_runs_csv,
                                write_sweep)
from scaling.record import record_row

TRUE_LAW = Approach3Fit(**TINY_TRUTH, n_points=0, objective=0.0, method="truth", flops_per_token=6.0)


def true_acc(L, s=SIGMOID_TRUTH):
    return ds.AccuracyFit(**s, n_points=0, rmse=0.0, ceiling_fixed=False)(L)


def table(tmp_path, **kw) -> pd.DataFrame:
    return load_runs_csv(write_runs_csv(tmp_path / "runs.csv", downstream_runs(**kw)))


# --------------------------------------------------------------------------------------------------------------------
# Step 2: the sigmoid
# --------------------------------------------------------------------------------------------------------------------
def test_sigmoid_fit_recovers_known_parameters():
    L = np.linspace(2.2, 4.8, 12)
    f = ds.fit_accuracy(L, true_acc(L), floor=0.25)
    assert (f.ceiling, f.k, f.L0) == pytest.approx((0.9, 3.0, 3.2), rel=1e-4)
    assert f.floor == 0.25 and f.rmse < 1e-6 and not f.ceiling_fixed
    # Noisy accuracies (1 point): still close, from starts that do not know the truth.
    acc = true_acc(L) + 0.01 * np.random.default_rng(0).standard_normal(len(L))
    g = ds.fit_accuracy(L, acc, floor=0.25)
    assert g.ceiling == pytest.approx(0.9, abs=0.03) and g.L0 == pytest.approx(3.2, abs=0.05)
    assert g.k == pytest.approx(3.0, rel=0.2)


def test_sigmoid_with_a_fixed_ceiling_keeps_it():
    truth = {"floor": 0.1, "ceiling": 1.0, "k": 5.0, "L0": 3.0}
    L = np.linspace(2.0, 4.5, 8)
    f = ds.fit_accuracy(L, true_acc(L, truth), floor=0.1, ceiling=1.0)
    assert f.ceiling == 1.0 and f.ceiling_fixed
    assert (f.k, f.L0) == pytest.approx((5.0, 3.0), rel=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# Two steps chained
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x", ["loss", "task_loss"])
def test_two_step_prediction_recovers_the_synthetic_truth(tmp_path, x):
    df = table(tmp_path)
    C = 1e17  # beyond every run (the largest is 4.8e16)
    r = ds.analyze_task(df, "cloze", x=x, predict_C=C, n_bootstrap=0)
    L_true = float(TRUE_LAW.L_opt(C))  # the compute-optimal run's loss under C = 6ND
    assert r["loss_law"]["kind"] == "approach3"
    want_L = L_true if x == "loss" else TASK_LOSS[0] * L_true + TASK_LOSS[1]
    assert r["prediction"]["L"] == pytest.approx(want_L, rel=1e-3)
    assert r["prediction"]["acc"] == pytest.approx(float(true_acc(L_true)), abs=2e-3)
    assert r["accuracy_fit"]["floor"] == SIGMOID_TRUTH["floor"]  # the chance level, fixed


def test_a_ladder_at_one_ratio_uses_the_frontier_law(tmp_path):
    """N and D proportional (D = 20 N): L(N, D) is not identified, so step 1 is L(C) on the frontier."""
    df = table(tmp_path, sizes=np.geomspace(1e5, 1e7, 7), tokens_per_param=(20,))
    r = ds.analyze_task(df, "cloze", predict_C=6 * 2e7 * 4e8, n_bootstrap=0)
    assert r["loss_law"]["kind"] == "kaplan_C"
    L_true = float(TRUE_LAW(2e7, 4e8))  # the next size of the ladder
    assert r["prediction"]["acc"] == pytest.approx(float(true_acc(L_true)), abs=0.02)


def test_auto_falls_back_to_the_frontier_law_when_approach3_has_no_optimum(tmp_path, monkeypatch):
    """A real CPU grid gave an L(N, D) whose loss falls towards the smallest N searched (no compute-optimal run):
    auto then fits L(C) and says why; an explicit --law approach3 keeps the error."""
    df = table(tmp_path)
    real = ds.LossLaw.at_C

    def no_optimum(self, C):
        if self.kind == "approach3":
            raise ValueError("constrained optimum at C=1e+17: the loss keeps falling towards N=3")
        return real(self, C)

    monkeypatch.setattr(ds.LossLaw, "at_C", no_optimum)
    r = ds.analyze_task(df, "cloze", predict_C=1e17, n_bootstrap=0)
    assert r["loss_law"]["kind"] == "kaplan_C" and "the loss keeps falling towards N=3" in r["law_note"]
    assert "fell back to the frontier law L(C)" in "\n".join(ds.task_lines(r))
    with pytest.raises(ValueError, match="the loss keeps falling"):
        ds.analyze_task(df, "cloze", law="approach3", predict_C=1e17, n_bootstrap=0)


def test_backtest_reports_the_held_out_error_and_interval(tmp_path):
    df = table(tmp_path, acc_noise=0.01, seed=1)
    pts = ds.task_points(df, "cloze")
    bt = ds.backtest_downstream(pts, floor=0.25, n_bootstrap=20, n_jobs=1)
    assert bt["hold"] == "N" and bt["held_out"] == 1e7 and bt["n_fit"] == 12
    assert [h["N"] for h in bt["runs"]] == [1e7] * 3
    for h in bt["runs"]:
        assert h["abs_error_points"] == pytest.approx(100 * abs(h["acc_predicted"] - h["acc_observed"]))
        lo, hi = h["acc_ci95"]
        assert lo <= h["acc_predicted"] <= hi and h["inside_ci95"] == (lo <= h["acc_observed"] <= hi)
    assert bt["mean_abs_error_points"] < 4
    # A held-out run far off the law shows up as a large error outside its interval.
    pts.loc[pts["N"] == 1e7, "acc"] = 0.4
    bad = ds.backtest_downstream(pts, floor=0.25, n_bootstrap=20, n_jobs=1)
    assert bad["mean_abs_error_points"] > 30 and bad["all_inside_ci95"] is False


def test_backtest_can_hold_out_the_largest_C(tmp_path):
    pts = ds.task_points(table(tmp_path), "cloze")
    bt = ds.backtest_downstream(pts, floor=0.25, hold="C", n_bootstrap=0)
    assert [h["name"] for h in bt["runs"]] == ["N1e+07-D8e+08"] and bt["n_fit"] == 14
    assert bt["runs"][0]["abs_error_points"] < 0.5 and bt["all_inside_ci95"] is None


# --------------------------------------------------------------------------------------------------------------------
# Loading, report, CLI
# --------------------------------------------------------------------------------------------------------------------
def test_eval_columns_survive_the_run_table(tmp_path):
    df = table(tmp_path)
    assert ds.eval_tasks(df) == ["cloze"]
    assert {"eval_cloze_acc", "eval_cloze_acc_norm", "eval_cloze_logprob", "eval_cloze_chance"} <= set(df.columns)
    row = downstream_runs().iloc[0]
    assert df.loc[df["name"] == row["name"], "eval_cloze_logprob"].item() == pytest.approx(row["eval_cloze_logprob"])


def test_synthetic_records_carry_the_eval_field(tmp_path):
    runs = downstream_runs(sizes=(1e5, 1e6), tokens_per_param=(10, 40))
    assert eval_record(runs.iloc[0].to_dict())["eval"]["cloze"]["chance"] == 0.25
    sweep = write_sweep(tmp_path / "sweep", runs, failed=0, diverged=0)
    rec = json.loads(next(sweep.rglob("record.json")).read_text())
    assert set(rec["eval"]["cloze"]) == {"accuracy", "accuracy_norm", "logprob", "n", "k", "chance", "kind"}
    want = runs.loc[runs["name"] == rec["name"], "eval_cloze_acc"].item()
    assert record_row(rec, "x")["eval_cloze_acc"] == pytest.approx(want)
    df = load_sweep(sweep)
    pts = ds.task_points(df, "cloze")  # the usable runs (not the planned-but-missing one write_sweep adds)
    assert ds.eval_tasks(df) == ["cloze"] and len(pts) == 4 and pts["logprob"].notna().all()


def _fast_report(monkeypatch):
    # Approach 2 alone: its failure on this grid is quick, and the section under test does not depend on the fits.
    monkeypatch.setattr(report, "fit_all", functools.partial(report.fit_all, approaches=(2,)))


def test_report_has_the_downstream_section_only_with_eval_columns(tmp_path, monkeypatch):
    _fast_report(monkeypatch)
    runs = downstream_runs(sizes=(1e5, 1e6, 1e7), tokens_per_param=(10, 40), acc_noise=0.01)
    with_eval = report.write_report(write_runs_csv(tmp_path / "a" / "runs.csv", runs), n_bootstrap=0, n_jobs=1)
    text = with_eval.read_text()
    assert "## Downstream" in text and "**cloze**" in text and "backtest" in text
    assert (with_eval.parent / "figures" / "emergence.png").exists()
    assert json.loads((with_eval.parent / "results.json").read_text())["downstream"][0]["task"] == "cloze"
    plain = runs.drop(columns=[c for c in runs.columns if c.startswith("eval_")])
    without = report.write_report(write_runs_csv(tmp_path / "b" / "runs.csv", plain), n_bootstrap=0, n_jobs=1)
    assert "Downstream" not in without.read_text()
    assert not (without.parent / "figures" / "emergence.png").exists()


def test_cli_prints_fit_prediction_and_backtest(tmp_path, capsys):
    csv = write_runs_csv(tmp_path / "runs.csv", downstream_runs())
    out = tmp_path / "ds.json"
    assert main(["downstream", str(csv), "--task", "cloze", "--predict-C", "1e17", "--bootstrap", "0",
                 "--json", str(out), "--plots", str(tmp_path / "figs")]) == 0
    text = capsys.readouterr().out
    assert "sigmoid" in text and "predicted at C = 1e+17" in text and "backtest" in text
    res = json.loads(out.read_text())
    assert res[0]["prediction"]["acc"] == pytest.approx(float(true_acc(TRUE_LAW.L_opt(1e17))), abs=2e-3)
    assert (tmp_path / "figs" / "accuracy_vs_loss.png").exists()


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------
def test_no_eval_columns_is_a_clear_error(tmp_path):
    runs = downstream_runs()
    df = load_runs_csv(write_runs_csv(tmp_path / "runs.csv", runs.drop(columns=[c for c in runs if "eval_" in c])))
    with pytest.raises(ValueError, match=r"no evaluation columns \(eval_<task>_acc\); evaluate the runs first"):
        ds.analyze_task(df, "cloze")
    with pytest.raises(ValueError, match="no evaluation columns"):
        ds.analyze_all(df)


def test_unknown_task_and_metric_are_clear_errors(tmp_path, capsys):
    df = table(tmp_path)
    with pytest.raises(ValueError, match=r"task 'hellaswag' has no evaluation columns .* evaluated tasks: \['cloze'\]"):
        ds.analyze_task(df, "hellaswag")
    with pytest.raises(ValueError, match="metric 'f1' is unknown; use one of"):
        ds.task_points(df, "cloze", "f1")
    with pytest.raises(ValueError, match="x 'bpb' is unknown"):
        ds.analyze_task(df, "cloze", x="bpb")
    assert main(["downstream", str(tmp_path / "runs.csv"), "--task", "hellaswag", "--bootstrap", "0"]) == 2
    assert "task 'hellaswag' has no evaluation columns" in capsys.readouterr().err


def test_too_few_runs_is_a_clear_error(tmp_path):
    df = table(tmp_path, sizes=(1e6,), tokens_per_param=(10, 40, 80))
    with pytest.raises(ValueError, match=r"downstream fit of task 'cloze'.*got 3 point\(s\), need at least 4"):
        ds.analyze_task(df, "cloze")
    pts = ds.task_points(table(tmp_path, sizes=(1e5, 1e6), tokens_per_param=(10, 40)), "cloze")
    with pytest.raises(ValueError, match=r"backtest: holding out the largest N \(1e\+06\) leaves 2 run\(s\)"):
        ds.backtest_downstream(pts, floor=0.25, n_bootstrap=0)


def test_all_at_chance_is_a_clear_error(tmp_path):
    df = table(tmp_path, tasks={"copy": {"floor": 0.5, "ceiling": 0.9, "k": 3.0, "L0": 1.0}})  # emerges at L < 1
    with pytest.raises(ValueError, match=r"all 15 runs score at chance \(best 0.50\d, chance 0.500\)"):
        ds.analyze_task(df, "copy")
    [res] = ds.analyze_all(df)  # the report lists the task with its reason instead of failing
    assert "score at chance" in res["error"]
    assert "not fitted: accuracy fit: all 15 runs score at chance" in "\n".join(ds.task_lines(res))

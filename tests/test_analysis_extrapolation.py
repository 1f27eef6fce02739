"""Extrapolation backtest (analysis.checks.extrapolation): the testbed loader, each fitting choice, recovery of a
known law."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.__main__ import main
from analysis.checks.extrapolation import (BASELINE, ONE_AT_A_TIME, FitChoice, combine, compare_choices,
                                           comparison_markdown, curve_noise, extrapolation_backtest, fit_choice,
                                           load_testbed, point_weights, select_points, split_by_size)
from analysis.synthetic import chinchilla_loss

SLICE = Path(__file__).parent / "data" / "misfitting2025_slice.csv"
TRUTH = {"E": 1.8, "A": 300.0, "B": 900.0, "alpha": 0.32, "beta": 0.36}
TIED = {**TRUTH, "alpha": 0.34, "beta": 0.34}


def law_curves(truth=TRUTH, sizes=(1e7, 2e7, 4e7, 8e7, 1e9), tokens_per_param=(10, 40), n_ckpt=10, noise=1e-4,
               seed=0) -> pd.DataFrame:
    """A point table from L(N, D) (Hoffmann et al. 2022 eq. 2): runs of each size and length, each with `n_ckpt`
    evenly spaced checkpoints whose loss is the law's at the tokens seen (as if every checkpoint were a finished run),
    times exp(noise * standard normal). A little noise by default: an exact law drives the Huber objective to 0, where
    L-BFGS's relative tolerance never stops it before maxiter."""
    rng = np.random.default_rng(seed)
    rows = []
    for N in sizes:
        for k in tokens_per_param:
            for i in range(1, n_ckpt + 1):
                D = k * N * i / n_ckpt
                loss = chinchilla_loss(N, D, **truth) * np.exp(noise * rng.standard_normal())
                rows.append({"run": f"N{N:g}-k{k}", "N": N, "D": D, "loss": loss, "frac": i / n_ckpt,
                             "final": i == n_ckpt})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------------
# The testbed loader
# --------------------------------------------------------------------------------------------------------------------
def test_load_testbed_keeps_the_best_learning_rate_run_with_its_checkpoints():
    pts = load_testbed(SLICE)
    finals = pts[pts["final"]]
    assert not finals.duplicated(["model", "D"]).any()  # one run per (model, length)
    # The slice holds the 50m's 4000-step runs at lr 0.001 (final loss 3.4866) and 0.004 (3.4019): the better is kept.
    assert len(pd.read_csv(SLICE).query("model == 'misfitting_50m' and total_steps == 4000")["peak_lr"].unique()) == 2
    fifty = finals[(finals["model"] == "misfitting_50m") & (finals["D"] == 4194304000)]
    assert len(fifty) == 1 and fifty["loss"].iloc[0] == pytest.approx(3.401900, abs=1e-6)
    assert not pts["run"].str.contains("misfitting_50m/lr0.001/steps4000").any()
    assert set(pts["N"].round(-6)) == {12e6, 25e6, 49e6, 99e6, 1002e6}  # non-embedding N by default
    assert (pts["frac"] <= 1).all() and pts.groupby("run")["final"].sum().eq(1).all()
    assert load_testbed(SLICE, n_column="N")["N"].min() == 57234240  # every parameter


def test_load_testbed_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_testbed(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    pd.read_csv(SLICE).drop(columns=["portion_steps_elapsed"]).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"lacks columns \['portion_steps_elapsed'\]"):
        load_testbed(bad)
    with pytest.raises(ValueError, match="n_column='params'"):
        load_testbed(SLICE, n_column="params")


# --------------------------------------------------------------------------------------------------------------------
# The harness recovers a known law
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", [BASELINE, FitChoice(method="vpnls"), FitChoice(method="vpnls", checkpoints=0.2),
                                    FitChoice(method="vpnls", weights="compute", drop_smallest=1)],
                         ids=lambda c: c.name)
def test_backtest_of_an_exact_law_has_no_error(choice):
    res = extrapolation_backtest(law_curves(noise=0 if choice.method == "vpnls" else 1e-4), choice, ratio=10)
    assert [h["N_over_fitted"] for h in res["heldout"]] == [12.5, 12.5]  # 1e9 predicted from sizes <= 8e7
    assert res["mean_abs_rel_error"] < 1e-3  # 12.5x beyond the data (huber: at 1e-4 noise)
    assert res["fit"]["alpha"] == pytest.approx(TRUTH["alpha"], abs=0.02)


@pytest.mark.parametrize("method", ["huber", "vpnls"])
def test_tied_exponents_fit_alpha_equal_beta_and_recover_a_tied_law(method):
    pts = law_curves(TIED)
    res = extrapolation_backtest(pts, FitChoice(method=method, tie_exponents=True), ratio=10)
    assert res["fit"]["alpha"] == res["fit"]["beta"] == pytest.approx(0.34, abs=0.01)
    assert res["mean_abs_rel_error"] < 1e-3
    untied = fit_choice(law_curves(TRUTH), FitChoice(method=method, tie_exponents=True))
    assert untied.alpha == untied.beta  # tied even when the data's exponents differ


# --------------------------------------------------------------------------------------------------------------------
# The choices are applied
# --------------------------------------------------------------------------------------------------------------------
def test_select_points_applies_checkpoints_smallest_sizes_and_frontier():
    pts = law_curves(noise=0.01)
    assert select_points(pts, BASELINE)["final"].all()
    ck = select_points(pts, FitChoice(checkpoints=0.3))
    assert set(ck["frac"].round(2)) == {0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0}
    assert len(select_points(pts, FitChoice(checkpoints=0.0))) == len(pts)
    assert select_points(pts, FitChoice(drop_smallest=2))["N"].min() == 4e7
    front = select_points(pts, FitChoice(checkpoints=0.0, frontier=0.0))
    C = 6 * pts["N"] * pts["D"]
    for c, loss in zip(6 * front["N"] * front["D"], front["loss"]):
        assert loss <= pts.loc[C <= c, "loss"].min()  # no point with less compute did better
    assert 0 < len(front) < len(select_points(pts, FitChoice(checkpoints=0.0, frontier=0.003))) < len(pts)


def test_point_weights_by_compute_and_inverse_variance():
    pts = law_curves(noise=0.01).query("final").reset_index(drop=True)
    w = point_weights(pts, FitChoice(weights="compute"))
    C = 6 * pts["N"] * pts["D"]
    np.testing.assert_allclose(w / w[0], C / C[0])
    sigma = pd.Series(0.02, index=pts["N"].unique())
    np.testing.assert_allclose(point_weights(pts, FitChoice(weights="inverse_variance"), sigma), 1 / 0.02 ** 2)
    vp = point_weights(pts, FitChoice(method="vpnls", weights="inverse_variance"), sigma)
    np.testing.assert_allclose(vp, 1 / (0.02 * pts["loss"]) ** 2)  # vpnls fits loss, not log loss
    with_sd = pts.assign(loss_sd=0.05 * pts["loss"])  # seed replicates win over the curve estimate
    np.testing.assert_allclose(point_weights(with_sd, FitChoice(weights="inverse_variance"), sigma), 1 / 0.05 ** 2)
    assert point_weights(pts, BASELINE) is None


def test_curve_noise_recovers_the_noise_of_smooth_curves():
    pts = law_curves(noise=0.01, n_ckpt=60, tokens_per_param=(20, 40, 80))
    sigma = curve_noise(pts)
    assert list(sigma.index) == sorted(pts["N"].unique())
    np.testing.assert_allclose(sigma.to_numpy(), 0.01, rtol=0.3)
    with pytest.raises(ValueError, match="no run has 3 checkpoints"):
        curve_noise(pts.query("final"))


def test_combine_keeps_every_changed_field():
    c = combine([FitChoice(tie_exponents=True), FitChoice(checkpoints=0.2), FitChoice(method="vpnls")])
    assert c == FitChoice(method="vpnls", checkpoints=0.2, tie_exponents=True)
    assert c.name == "vpnls ckpt>=0.2 alpha=beta"
    vp = FitChoice(method="vpnls")
    assert combine([FitChoice(method="vpnls", weights="compute")], vp) == FitChoice(method="vpnls", weights="compute")


def test_compare_choices_on_the_testbed_slice():
    pts = load_testbed(SLICE)
    choices = [FitChoice(method="vpnls"), FitChoice(method="vpnls", tie_exponents=True),
               FitChoice(method="vpnls", checkpoints=0.2)]
    cmp = compare_choices(pts, choices, ratios=(10,), combinations=False)
    assert [r["choice"] for r in cmp["rows"]] == [c.name for c in choices]
    for row, res in zip(cmp["rows"], cmp["results"]):
        assert [h["run"].split("/")[1] for h in res["heldout"]] == ["misfitting_1b"] * 2  # 10.1x the 100m
        errs = [abs(h["predicted"] - h["loss"]) / h["loss"] for h in res["heldout"]]
        assert row["mean_abs_rel_error"] == pytest.approx(np.mean(errs))
    assert cmp["best"] == min(cmp["rows"], key=lambda r: r["mean_abs_rel_error"])["choice"]
    md = comparison_markdown(cmp)
    assert f"**{cmp['best']}**" in md and "| vpnls alpha=beta |" in md


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------
def test_split_and_choice_errors():
    pts = law_curves()
    with pytest.raises(ValueError, match="need at least 2 to fit"):
        split_by_size(pts, ratio=60)
    train, test = split_by_size(pts, ratio=2, max_size=1e8, min_ratio=2)  # without the 1e9, 8e7 is the target
    assert train["N"].max() == 4e7 and set(test["N"]) == {8e7} and test["final"].all()
    with pytest.raises(ValueError, match="no size is 10x"):
        split_by_size(pts, ratio=2, max_size=1e8, min_ratio=10)
    with pytest.raises(ValueError, match="max_size=1e\\+06 is below every model size"):
        split_by_size(pts, ratio=2, max_size=1e6)
    with pytest.raises(ValueError, match="ratio=1"):
        split_by_size(pts, ratio=1)
    with pytest.raises(ValueError, match="no size is 30x the largest fitted.*the largest is 25x"):
        split_by_size(pts, ratio=20, min_ratio=30)
    with pytest.raises(ValueError, match="drop_smallest=4 leaves 1 of 5 sizes"):
        select_points(pts, FitChoice(drop_smallest=4))
    with pytest.raises(ValueError, match=r"lacks columns \['frac', 'final'\]"):
        extrapolation_backtest(pts.drop(columns=["frac", "final"]), BASELINE, ratio=10)


@pytest.mark.parametrize("field, value", [("method", "ols"), ("weights", "seed"), ("checkpoints", 1.5),
                                          ("frontier", -0.1), ("drop_smallest", -1)])
def test_fit_choice_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"fit choice {field}={value!r}"):
        FitChoice(**{field: value})


def test_cli_errors(tmp_path, capsys):
    assert main(["extrapolation", str(tmp_path / "none.csv"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["extrapolation", str(SLICE), "--out", str(tmp_path), "--ratios", "ten"]) == 2
    assert "--ratios 'ten'" in capsys.readouterr().err


def test_cli_writes_the_comparison(tmp_path, capsys):
    assert main(["extrapolation", str(SLICE), "--out", str(tmp_path), "--ratios", "10,20", "--method", "vpnls"]) == 0
    cmp = json.loads((tmp_path / "extrapolation.json").read_text())
    assert cmp["ratios"] == [10.0, 20.0] and cmp["n_column"] == "N_no_emb"
    names = [r["choice"] for r in cmp["rows"]]
    assert names[:12] == [c.name for c in ONE_AT_A_TIME if c.method == "vpnls"]  # then the combinations
    assert all(n.startswith("vpnls") for n in names)  # combinations of the reference, the vpnls baseline
    drop2 = next(r for r in cmp["rows"] if r["choice"] == "vpnls drop2")  # 3 sizes below N_max / 20: one left
    assert "drop_smallest=2 leaves 1 of 3 sizes" in drop2["error"]
    md = (tmp_path / "extrapolation.md").read_text()
    assert f"**{cmp['best']}**" in md and "misfitting2025_slice.csv, N = N_no_emb" in md
    assert "Extrapolation backtest" in capsys.readouterr().out

"""Fits recover known laws; bad inputs get clear errors."""

import numpy as np
import pandas as pd
import pytest

from scipy import optimize

from analysis.laws.approach3 import _huber_lse_objective, fit_approach3, fit_approach3_vpnls
from analysis.laws.fits import (fit_approach1, fit_approach2, fit_kaplan, fit_parabola, fit_power_law, isoflop_minima,
                                lower_envelope)
from analysis.synthetic import CHINCHILLA_TRUTH, chinchilla_loss, isoflop_runs

T = CHINCHILLA_TRUTH
TRUE_A = T["beta"] / (T["alpha"] + T["beta"])  # Hoffmann et al. 2022 eq. 4


def test_power_law_recovers_exponent_and_weights_matter():
    C = np.logspace(16, 20, 9)
    N = 0.1 * C ** 0.5
    N[-1] *= 3  # one outlier
    w = np.ones(9)
    w[-1] = 1e-8
    assert fit_power_law(C, N, w).a == pytest.approx(0.5, abs=1e-6)
    assert fit_power_law(C, N).a > 0.52  # unweighted, the outlier pulls the slope up


def test_kaplan_power_law_and_irreducible_term():
    N = np.logspace(6, 10, 12)
    L = (8.8e13 / N) ** 0.076  # Kaplan et al. 2020 eq. 1.1 constants
    fit = fit_kaplan(N, L)
    assert fit.alpha == pytest.approx(0.076, rel=1e-6) and fit.X_c == pytest.approx(8.8e13, rel=1e-4)
    fit_e = fit_kaplan(N, 1.5 + (1e9 / N) ** 0.3, irreducible=True)
    assert (fit_e.E, fit_e.alpha) == (pytest.approx(1.5, rel=1e-3), pytest.approx(0.3, rel=1e-3))
    assert fit_e.as_dict()["alpha_N"] == fit_e.alpha


def test_lower_envelope_keeps_running_minimum():
    x, y = lower_envelope([3, 1, 2, 4], [2.0, 3.0, 2.5, 2.2])
    assert x.tolist() == [1, 2, 3] and y.tolist() == [3.0, 2.5, 2.0]


def test_approach2_recovers_true_exponent_on_clean_isoflops():
    runs = isoflop_runs(noise=0.0, n_per_budget=15, span=0.6)
    fit = fit_approach2(runs)
    assert fit.N_opt.a == pytest.approx(TRUE_A, abs=0.01)
    assert fit.D_opt.a == pytest.approx(1 - TRUE_A, abs=0.01)
    # The minimum of a parabola in log N is within 3% of the true N_opt at each budget.
    G = (T["alpha"] * T["A"] / (T["beta"] * T["B"])) ** (1 / (T["alpha"] + T["beta"]))
    np.testing.assert_allclose(fit.minima["N_opt"], G * (fit.minima["C"] / 6) ** TRUE_A, rtol=0.03)


def test_approach2_skips_unbracketed_budget_with_reason():
    runs = isoflop_runs(noise=0.0)
    big = runs["budget"] == runs["budget"].max()
    keep = ~big | (runs["N"] < runs.loc[big, "N"].median() * 0.5)  # only small models at the top budget
    fit = fit_approach2(runs[keep])
    assert fit.skipped["C"].tolist() == [runs["budget"].max()]
    assert len(fit.minima) == runs["budget"].nunique() - 1


def test_parabola_errors():
    with pytest.raises(ValueError, match="opens downwards"):
        fit_parabola([1, 2, 3, 4], [1.0, 2.0, 2.1, 1.0], budget=1e18)
    with pytest.raises(ValueError, match="need at least 3"):
        fit_parabola([1, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="method='spline' is unknown"):
        isoflop_minima(isoflop_runs(), method="spline")


def test_approach1_from_curves_recovers_allocation():
    """Curves from the true L(N, D) along training: the envelope's N_opt(C) slope is the true a."""
    rows = []
    for N in np.logspace(7, 9.5, 12):
        D = np.logspace(8, 12, 80)
        for d, l in zip(D, chinchilla_loss(N, D, **T)):
            rows.append({"run": f"N{N:.3g}", "N": N, "D": d, "C": 6 * N * d, "loss": l})
    fit = fit_approach1(pd.DataFrame(rows), n_grid=200)
    assert fit.N_opt.a == pytest.approx(TRUE_A, abs=0.05)
    assert fit.frontier["N"].nunique() >= 5


def test_approach1_error_when_one_model_wins_everywhere():
    # b covers a wider C range than a and is lower at every C.
    rows = [{"run": r, "N": N, "D": d, "C": 6 * N * d, "loss": 5 - 0.1 * i - (0.5 if r == "b" else 0)}
            for r, N, lo, hi in (("a", 1e6, 9, 10), ("b", 1e7, 7.9, 9.1)) for i, d in enumerate(np.logspace(lo, hi, 5))]
    with pytest.raises(ValueError, match="one model size wins"):
        fit_approach1(pd.DataFrame(rows))


@pytest.mark.parametrize("fitter", [fit_approach3, fit_approach3_vpnls])
def test_approach3_recovers_truth_without_noise(fitter):
    runs = isoflop_runs(noise=0.0)
    fit = fitter(runs["N"], runs["D"], runs["loss"])
    for k in ("E", "alpha", "beta"):
        assert getattr(fit, k) == pytest.approx(T[k], rel=0.02), k
    for k in ("A", "B"):
        assert getattr(fit, k) == pytest.approx(T[k], rel=0.15), k
    assert fit.a == pytest.approx(TRUE_A, abs=0.005)
    # Hoffmann et al. 2022 eq. 4: N_opt D_opt = C / 6, and N_opt minimises L on the IsoFLOP line.
    C = 1e22
    assert fit.N_opt(C) * fit.D_opt(C) == pytest.approx(C / 6, rel=1e-9)
    n = fit.N_opt(C) * np.array([0.9, 1.0, 1.1])
    assert np.argmin(fit(n, C / (6 * n))) == 1


def test_approach3_few_screened_starts_reach_the_best_optimum():
    """Screening the paper's grid and refining the best starts finds the optimum that more starts find."""
    runs = isoflop_runs(noise=0.02, seed=3)
    few = fit_approach3(runs["N"], runs["D"], runs["loss"], n_starts=4)
    many = fit_approach3(runs["N"], runs["D"], runs["loss"], n_starts=48)
    assert few.objective == pytest.approx(many.objective, rel=1e-6)
    assert few.alpha == pytest.approx(many.alpha, abs=1e-4)


def test_huber_lse_gradient_matches_finite_differences():
    runs = isoflop_runs(noise=0.05, seed=1)
    args = (np.log(runs["N"].to_numpy()), np.log(runs["D"].to_numpy()), np.log(runs["loss"].to_numpy()), 1e-3)
    for p in ([6.0, 6.5, 0.4, 0.34, 0.28], [5.0, 7.0, 0.6, 0.3, 0.35]):
        err = optimize.check_grad(lambda q: _huber_lse_objective(q, *args)[0],
                                  lambda q: _huber_lse_objective(q, *args)[1], np.array(p))
        assert err < 1e-6 * max(1.0, np.abs(_huber_lse_objective(np.array(p), *args)[1]).max())


@pytest.mark.parametrize("bad, match", [
    ({"N": [1e6, -1, 1e7, 1e8, 1e9, 1e10]}, "N: 1 value"),
    ({"loss": [3, 2.5, np.nan, 2.2, 2.1, 2.0]}, "loss: 1 value.*NaN"),
    ({"N": [1e6, 1e7], "D": [1e9, 1e9], "loss": [3.0, 2.9]}, "got 2 point.*need at least 6"),
    ({"D": [1e9] * 5}, "lengths 6, 5, 6"),
])
def test_approach3_input_errors(bad, match):
    cols = {"N": np.logspace(6, 10, 6), "D": np.logspace(9, 11, 6), "loss": np.linspace(3, 2, 6)} | bad
    for fitter in (fit_approach3, fit_approach3_vpnls):
        with pytest.raises(ValueError, match=match):
            fitter(cols["N"], cols["D"], cols["loss"])


def test_power_law_errors():
    with pytest.raises(ValueError, match="all x are equal"):
        fit_power_law([1e18, 1e18], [1.0, 2.0])
    # Two runs of one IsoFLOP budget (the quickstart's C = 1e11 line): C differs by rounding only; this fitted a
    # Kaplan alpha_C of 2870 into the report.
    with pytest.raises(ValueError, match=r"span a factor of only 1.000033 .*one compute budget.*at least 1% apart"):
        fit_kaplan([1.000028e11, 1.000061e11], [2.601518, 2.365269], variable="C")
    assert fit_power_law([1e18, 1.0101e18], [1.0, 0.99]).n_points == 2  # 1% apart is a range
    with pytest.raises(ValueError, match="weights: length 1"):
        fit_power_law([1, 2, 3], [1, 2, 3], [1.0])
    with pytest.raises(ValueError, match="need at least 2"):
        fit_power_law([1], [1])


def test_a_runaway_approach3_fit_evaluates_without_warnings():
    # A bootstrap resample can drive log A past float64's exp range and alpha far up (the README quickstart's report
    # printed four RuntimeWarnings from such refits); the values follow IEEE (term 0, or nan for inf / inf) and the
    # caller judges them.
    import warnings

    from analysis.laws.approach3 import Approach3Fit

    runaway = Approach3Fit(E=1.7, A=float("inf"), B=400.0, alpha=900.0, beta=0.3, n_points=9, objective=0.0,
                           method="huber-lbfgs")
    huge = Approach3Fit(E=1.7, A=1e300, B=400.0, alpha=-900.0, beta=0.3, n_points=9, objective=0.0, method="huber-lbfgs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(runaway(1e6, 1e9))
        assert huge(1e6, 1e9) == np.inf
        assert runaway(np.array([1e6]), np.array([1e9])).shape == (1,)

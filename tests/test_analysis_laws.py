"""Custom laws (analysis.laws.law, analysis.laws.expr) and the data-constrained law (analysis.laws.data_constrained):
fits recover known parameters, the Chinchilla instance reproduces analysis.laws.approach3, golden values from
Muennighoff et al. 2023."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from analysis.__main__ import main
from analysis.laws import expr
from analysis.laws.approach3 import fit_approach3
from analysis.laws.data_constrained import (DATA_CONSTRAINED, PUBLISHED, effective_data, fit_data_constrained, loss,
                                            markdown_section, optimal_allocation)
from analysis.laws.law import (CHINCHILLA, KAPLAN_N, Law, LawStat, Param, backtest_law, expression_law, fit_law,
                               fit_with_intervals, law_inputs, load_law, parse_param, plot_law_fit)
from analysis.synthetic import CHINCHILLA_TRUTH, isoflop_runs

CHINCHILLA_KEYS = ("E", "A", "B", "alpha", "beta")


# --------------------------------------------------------------------------------------------------------------------
# The formula language
# --------------------------------------------------------------------------------------------------------------------
def test_expression_gradient_matches_finite_differences():
    f = expr.parse("G = A/B; U = minimum(N, G*D); E + A/U**alpha + B*exp(-beta*log(D))", {"E", "A", "B", "alpha",
                                                                                          "beta", "N", "D"})
    X = {"N": np.array([1e6, 1e7, 1e9]), "D": np.array([1e8, 1e9, 3e9])}
    p = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}
    v, g = expr.evaluate(f, {**X, **p}, tuple(p), grad=True)
    assert g.shape == (5, 3)
    for i, k in enumerate(p):
        h = 1e-6 * p[k]
        fd = (expr.evaluate(f, {**X, **p, k: p[k] + h}) - expr.evaluate(f, {**X, **p, k: p[k] - h})) / (2 * h)
        np.testing.assert_allclose(g[i], fd, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("text, match", [
    ('__import__("os").system("true")', "call of .*system.* is not allowed"),
    ('open("f")', "call of 'open' is not allowed"),
    ("N.__class__", "is not allowed in a formula"),
    ("N[0]", "is not allowed in a formula"),
    ("x + N", "unknown name 'x'"),
    ("exp + N", "'exp' is a function; call it"),
    ("N if N else 1", "is not allowed in a formula"),
    ("N = 2; N", "cannot be redefined"),
    ('"text"', "is not a number"),
    ("N +", "is not a formula"),
    ("", "law expression is empty"),
])
def test_expression_refuses_anything_but_a_formula(text, match):
    with pytest.raises(ValueError, match=match):
        expr.parse(text, {"N"})


# --------------------------------------------------------------------------------------------------------------------
# Laws and their fit
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: Param("A", 1.0, 0.5, (1.0,)), "lo < hi"),
    (lambda: Param("A", 0.0, 5.0, (1.0,), log=True), "needs lo > 0"),
    (lambda: Param("A", 0.0, 5.0, (7.0,)), r"must lie in \[0.0, 5.0\]"),
    (lambda: Param("2A", 0.0, 5.0, (1.0,)), "not a valid name"),
    (lambda: Law("l", (Param("a", 0, 1, (0.5,)),), ("N",), expression="N**a + b"), "unknown name 'b'"),
    (lambda: Law("l", (Param("a", 0, 1, (0.5,)), Param("b", 0, 1, (0.5,))), ("N",), expression="N**a"),
     r"parameters \['b'\] do not appear"),
    (lambda: Law("l", (Param("a", 0, 1, (0.5,)),), ("Q",), expression="a"), r"inputs \['Q'\] are unknown"),
    (lambda: Law("l", (Param("N", 0, 1, (0.5,)),), ("N",), expression="N"), "declared twice"),
    (lambda: Law("l", (Param("a", 0, 1, (0.5,)),), ("N",)), "exactly one of an expression and a function"),
])
def test_bad_law_declarations_are_one_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_chinchilla_instance_reproduces_approach3():
    runs = isoflop_runs(noise=0.01, n_per_budget=6)
    with threadpool_limits(limits=1, user_api="blas"):  # as fit_law: L-BFGS-B with a threaded BLAS is slow
        a3 = fit_approach3(runs["N"], runs["D"], runs["loss"], n_starts=4)
    law = fit_law(CHINCHILLA, runs, n_starts=4)  # the same 4 best points of the paper's grid
    for k in CHINCHILLA_KEYS:
        assert law.params[k] == pytest.approx(getattr(a3, k), rel=1e-6), k
    assert law.objective == pytest.approx(a3.objective, rel=1e-9)
    assert law.at_bound == ()


def test_kaplan_instance_recovers_the_paper_constants():
    N = np.logspace(6, 10, 12)
    fit = fit_law(KAPLAN_N, {"N": N, "loss": (8.8e13 / N) ** 0.076})  # Kaplan et al. 2020 eq. 1.1, table 1
    assert fit.params["alpha_N"] == pytest.approx(0.076, rel=1e-5)
    assert fit.params["N_c"] == pytest.approx(8.8e13, rel=1e-3)


def _grid_runs(truth: dict, noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e9, 5), np.geomspace(1e8, 1e10, 5)))
    L = truth["E"] + truth["A"] / N ** truth["alpha"] + truth["B"] / D ** truth["beta"]
    L = L * np.exp(noise * np.random.default_rng(seed).standard_normal(len(N)))
    return pd.DataFrame({"name": [f"r{i}" for i in range(len(N))], "N": N, "D": D, "loss": L})


def test_expression_law_from_cli_specs_recovers_truth():
    law = expression_law("E + A/N**alpha + B/D**beta",
                         ["E=0.1:10:1,2", "A=1:1e6:100,1000:log", "B=1:1e6:100,1000:log", "alpha=0:2:0.3",
                          "beta=0:2:0.3"])
    assert law.inputs == ("N", "D")
    fit = fit_law(law, _grid_runs(CHINCHILLA_TRUTH))
    for k in CHINCHILLA_KEYS:
        assert fit.params[k] == pytest.approx(CHINCHILLA_TRUTH[k], rel=1e-4), k


def test_function_law_fits_like_an_expression_law():
    def power(X, p):  # a Python function law: vectorised over the runs
        return p["E"] + p["A"] / X["N"] ** p["alpha"]

    params = (Param("E", 0.1, 10, (1.0, 2.0)), Param("A", 1.0, 1e6, (10.0, 1e3), log=True),
              Param("alpha", 0.0, 2.0, (0.3, 0.6)))
    N = np.geomspace(1e6, 1e9, 10)
    data = {"N": N, "loss": 1.5 + 300 / N ** 0.3}
    by_fn = fit_law(Law("fn", params, ("N",), function=power), data)
    by_expr = fit_law(Law("ex", params, ("N",), expression="E + A/N**alpha"), data)
    for k, v in (("E", 1.5), ("A", 300.0), ("alpha", 0.3)):
        assert by_fn.params[k] == pytest.approx(v, rel=1e-4) and by_expr.params[k] == pytest.approx(v, rel=1e-4)


def test_parameter_on_a_bound_is_flagged():
    law = expression_law("E + A/N**alpha", ["E=0.1:10:1", "A=1:1e6:100:log", "alpha=0.5:2:0.6"])
    N = np.geomspace(1e6, 1e9, 10)
    fit = fit_law(law, {"N": N, "loss": 1.5 + 300 / N ** 0.3})  # true alpha 0.3 lies below the bound 0.5
    assert "alpha" in fit.at_bound and fit.params["alpha"] == pytest.approx(0.5)


@pytest.mark.parametrize("spec, match", [
    ("alpha=0:2", "write NAME=LO:HI:INIT"),
    ("alpha", "write NAME=LO:HI:INIT"),
    ("alpha=0:two:1", "must be numbers"),
    ("A=0:10:1:log", "needs lo > 0"),
])
def test_bad_param_specs_are_one_clear_error(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_param(spec)


def test_fit_errors_name_the_problem():
    with pytest.raises(ValueError, match="reads U_D, which the run table lacks"):
        law_inputs(DATA_CONSTRAINED, pd.DataFrame({"N": [1.0], "D": [2.0], "loss": [3.0]}))
    with pytest.raises(ValueError, match="need at least 6"):
        fit_law(CHINCHILLA, _grid_runs(CHINCHILLA_TRUTH).head(5))
    with pytest.raises(ValueError, match=r"fixed parameters \['Z'\] are not its parameters"):
        fit_law(CHINCHILLA, _grid_runs(CHINCHILLA_TRUTH), fixed={"Z": 1.0})
    with pytest.raises(ValueError, match="every parameter is fixed"):
        fit_law(KAPLAN_N, {"N": [1.0, 2.0], "loss": [1.0, 1.0]}, fixed={"N_c": 1.0, "alpha_N": 1.0})
    with pytest.raises(ValueError, match=r"init lacks \['beta'\]"):
        fit_law(CHINCHILLA, _grid_runs(CHINCHILLA_TRUTH), init={"E": 1, "A": 1, "B": 1, "alpha": 1})


def test_load_law_from_a_file_and_its_errors(tmp_path):
    f = tmp_path / "my_laws.py"
    f.write_text("from analysis.laws.law import Law, Param\n"
                 "LAW = Law('mine', (Param('E', 0.1, 10, (1.0,)), Param('A', 1, 1e6, (100.0,), log=True),\n"
                 "          Param('alpha', 0, 2, (0.3,))), ('N',), expression='E + A/N**alpha')\n"
                 "NOT_A_LAW = 3\n")
    assert load_law(f"{f}:LAW").name == "mine"
    assert load_law("data_constrained") is DATA_CONSTRAINED
    with pytest.raises(ValueError, match="defines no Law named 'NOT_A_LAW'"):
        load_law(f"{f}:NOT_A_LAW")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_law(f"{tmp_path / 'nope.py'}:LAW")
    with pytest.raises(ValueError, match="give a built-in law"):
        load_law("chinchila")


def test_bootstrap_intervals_and_backtest_of_a_law(tmp_path):
    runs = _grid_runs(CHINCHILLA_TRUTH, noise=0.005)
    law = expression_law("E + A/N**alpha + B/D**beta", ["E=0.1:10:1,2", "A=1:1e6:100,1000:log",
                                                        "B=1:1e6:100,1000:log", "alpha=0:2:0.3", "beta=0:2:0.3"])
    fixed = {"E": CHINCHILLA_TRUTH["E"], "A": CHINCHILLA_TRUTH["A"], "B": CHINCHILLA_TRUTH["B"]}
    r = fit_with_intervals(law, runs, n_bootstrap=20, n_jobs=1, fixed=fixed)
    assert set(r["ci95"]) == {"alpha", "beta"}
    for k in ("alpha", "beta"):
        lo, hi = r["ci95"][k]
        assert lo < r["estimate"][k] < hi and lo < CHINCHILLA_TRUTH[k] < hi and hi - lo < 0.05
    bt = backtest_law(law, runs, N_below=2e8, fixed=fixed)
    assert bt.summary()["n_test_runs"] == 10 and bt.summary()["mean_abs_rel_error"] < 0.01
    with pytest.raises(ValueError, match="leaves 25 runs to fit and 0 to predict"):
        backtest_law(law, runs, N_below=1e12)
    paths = plot_law_fit(r["fit"], runs, tmp_path)
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 1000 for p in paths)
    assert LawStat(law, init=dict(r["fit"].params), fixed=fixed)(runs).keys() == {"alpha", "beta"}


# --------------------------------------------------------------------------------------------------------------------
# The data-constrained law (Muennighoff et al. 2023)
# --------------------------------------------------------------------------------------------------------------------
# The paper's constants (eq. 5 fitted on C4; R_D* ~ 15.4 and R_N* ~ 5.3 in the text) to the 7 digits the authors'
# repository lists (huggingface/datablations README, "Parametric Fit"; analysis.laws.data_constrained.PUBLISHED). That
# README evaluates the law for the two models of the paper's Figure 1 (right) and finds the optimum of the second's
# budget.
FIGURE1_RIGHT = [((6.34e9, 242e9, 25e9), 2.2256440889984477), ((8.67e9, 178e9, 25e9), 2.2269634075087867)]
README_OPTIMUM = {"D": 227e9, "epochs": 9.1, "N": 6.8e9}  # "-> 227B tokens, 9.1 epochs, 6.8B parameters"


def test_published_constants_reproduce_the_papers_numbers():
    assert PUBLISHED["R_D_star"] == pytest.approx(15.4, abs=0.05) and PUBLISHED["R_N_star"] == pytest.approx(5.3, abs=0.05)
    for (N, D, U), L in FIGURE1_RIGHT:
        assert float(loss(PUBLISHED, N, D, U)) == pytest.approx(L, rel=1e-12)
    # Figure 1 (right): at equal compute, fewer parameters and more epochs predict the lower loss.
    assert FIGURE1_RIGHT[0][1] < FIGURE1_RIGHT[1][1]


def test_compute_optimal_allocation_under_a_data_limit_matches_the_authors():
    opt = optimal_allocation(PUBLISHED, C=6 * 8.67e9 * 178e9, U_max=25e9)
    # The README's grid search has 500 points over [1/3, 3]x; the continuous optimum agrees to its resolution.
    for k, v in README_OPTIMUM.items():
        assert opt[k] == pytest.approx(v, rel=0.01), k
    assert opt["loss"] < FIGURE1_RIGHT[0][1]  # better than both models of Figure 1 (right)
    with pytest.raises(ValueError, match="must all be positive"):
        optimal_allocation(PUBLISHED, C=-1.0, U_max=25e9)


def test_four_epochs_are_almost_as_good_as_unique_data():
    # Abstract: "training with up to 4 epochs of repeated data yields negligible changes to loss compared to having
    # unique data"; sec. 3: a repeated token is worth less each epoch, and beyond ~R_D* repetitions adds little.
    N, D = 6.8e9, 227e9
    unique = float(loss(PUBLISHED, N, D, D))
    rel = {ep: float(loss(PUBLISHED, N, D, D / ep)) / unique - 1 for ep in (2, 4, 16, 40)}
    assert 0 < rel[2] < rel[4] < 0.005  # 4 epochs: under 0.5% worse than unique data
    assert rel[16] > 0.02 and rel[40] > 2 * rel[16]  # many epochs: clearly worse
    Rs = PUBLISHED["R_D_star"]
    worth = effective_data(1.0, np.array([4.0, 16.0, 40.0, 1e6]), Rs)  # D' / U_D
    assert worth[0] / 4 > 0.93 and worth[-1] == pytest.approx(1 + Rs)  # saturates at U_D (1 + R_D*)


def _repeated_runs(params: dict, noise: float, seed: int = 0) -> pd.DataFrame:
    N, U, ep = (a.ravel() for a in np.meshgrid(np.geomspace(1e8, 3e9, 4), [1e9, 1e10], [1, 2, 4, 8, 16, 32, 64]))
    L = loss(params, N, U * ep, U) * np.exp(noise * np.random.default_rng(seed).standard_normal(len(N)))
    return pd.DataFrame({"name": [f"r{i}" for i in range(len(N))], "N": N, "D": U * ep, "epochs": ep, "loss": L,
                         "C": 6 * N * U * ep})


def test_recovers_R_D_star_from_noisy_points_generated_by_the_published_law():
    runs = _repeated_runs(PUBLISHED, noise=0.005)  # 56 runs, 0.5% loss noise
    fixed = {k: PUBLISHED[k] for k in ("E", "A", "B", "alpha", "beta")}  # the paper's second stage
    fit = fit_law(DATA_CONSTRAINED, runs, fixed=fixed)
    assert fit.params["R_D_star"] == pytest.approx(PUBLISHED["R_D_star"], rel=0.15)
    assert fit.params["R_N_star"] == pytest.approx(PUBLISHED["R_N_star"], rel=0.25)
    exact = fit_law(DATA_CONSTRAINED, _repeated_runs(PUBLISHED, noise=0.0), fixed=fixed)
    assert exact.params["R_D_star"] == pytest.approx(PUBLISHED["R_D_star"], rel=1e-4)


def test_fit_data_constrained_in_two_stages_gives_intervals_allocation_and_a_report_section():
    runs = _repeated_runs(PUBLISHED, noise=0.005)
    res = fit_data_constrained(runs, n_bootstrap=8, n_jobs=1, two_stage=True, C=6 * 8.67e9 * 178e9, U_max=25e9)
    assert res["stages"].startswith("two") and set(res["ci95"]) == {"R_D_star", "R_N_star", "opt_N", "opt_D",
                                                                     "opt_epochs", "opt_loss"}
    lo, hi = res["ci95"]["R_D_star"]
    assert lo <= res["R_D_star"] <= hi
    assert res["allocation"]["epochs"] > 1
    text = "\n".join(markdown_section(res))
    assert "## Data-constrained law" in text and "| R_D_star |" in text and "Compute-optimal under a data limit" in text
    assert "| alpha | " in text and "held from stage 1" in text
    with pytest.raises(ValueError, match="need epochs"):
        fit_data_constrained(runs.drop(columns="epochs"), n_bootstrap=0)


@pytest.mark.slow  # all 7 parameters from a grid of 72,000 starts: 2 s idle, ~30 s on two busy cores
def test_fit_data_constrained_all_at_once_recovers_the_published_law():
    res = fit_data_constrained(_repeated_runs(PUBLISHED, noise=0.002), n_bootstrap=0, two_stage="auto")
    assert res["stages"].startswith("one")  # 8 single-epoch runs: too few for a first stage
    assert res["R_D_star"] == pytest.approx(PUBLISHED["R_D_star"], rel=0.3)
    assert res["alpha"] == pytest.approx(PUBLISHED["alpha"], rel=0.1)


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------
def test_cli_fits_a_law_expression_and_the_data_constrained_law(tmp_path, capsys):
    csv = tmp_path / "runs.csv"
    _grid_runs(CHINCHILLA_TRUTH, noise=0.002).to_csv(csv, index=False)
    out = tmp_path / "fit.json"
    rc = main(["fit", "--csv", str(csv), "--name", "name", "--bootstrap", "4", "--jobs", "1", "--json", str(out),
               "--law-expr", "E + A/N**alpha + B/D**beta", "--param", "E=0.1:10:1,2", "--param", "A=1:1e6:100:log",
               "--param", "B=1:1e6:100:log", "--param", "alpha=0:2:0.3", "--param", "beta=0:2:0.3",
               "--law-backtest-N", "2e8", "--plots", str(tmp_path / "figs")])
    text = capsys.readouterr().out
    assert rc == 0 and "law custom" in text and "alpha = 0.3" in text and "backtest (fit N < 2e+08" in text
    res = json.loads(out.read_text())
    assert res["beta"] == pytest.approx(CHINCHILLA_TRUTH["beta"], rel=0.05) and "alpha" in res["ci95"]
    assert (tmp_path / "figs" / "law_custom.png").is_file()


@pytest.mark.parametrize("extra, match", [
    (["--param", "E=0:1:0.5"], "--param declares the parameters of a --law-expr"),
    (["--law", "nope"], "give a built-in law"),
    (["--law", "missing_laws.py:LAW"], "the file 'missing_laws.py' does not exist"),
    (["--law-expr", "E + A/N**alpha", "--param", "E=0:1"], "write NAME=LO:HI:INIT"),
    (["--law-expr", "E + A/N**alpha"], "declare its parameters with --param"),
    (["--law", "data_constrained"], "the runs need epochs (D / unique tokens) for U_D"),
])
def test_cli_law_errors_are_clear(tmp_path, capsys, extra, match):
    csv = tmp_path / "runs.csv"
    _grid_runs(CHINCHILLA_TRUTH).to_csv(csv, index=False)
    args = ["fit", "--csv", str(csv), "--bootstrap", "0"] + extra
    if "--param" in extra and "--law-expr" not in extra:
        args += ["--law", "chinchilla"]
    assert main(args) == 2
    assert match in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # approach3's exp of an infinite log A, on purpose
def test_approach3_says_why_when_no_start_stays_finite():
    # Losses that do not vary with N: Approach 3's unbounded fit sends A to infinity; a warm start from it must be a
    # clear error (the report then says so), while the bounded law fit flags the parameters at their bounds.
    runs = _grid_runs(CHINCHILLA_TRUTH)
    runs["loss"] = 2.0 + 400 / runs["D"] ** 0.3
    with pytest.raises(ValueError, match="no start reached finite parameters"):
        fit_approach3(runs["N"], runs["D"], runs["loss"], n_starts=0, init=(1.0, math.inf, 400.0, 0.3, 0.3))
    fit = fit_law(CHINCHILLA, runs, n_starts=8)
    assert set(fit.at_bound) & {"A", "alpha"} and fit.params["beta"] == pytest.approx(0.3, rel=1e-3)


def test_report_adds_the_data_constrained_section_only_when_runs_repeat_data():
    from analysis.load import runs_table
    from analysis.report.build import fit_all, markdown

    runs = _repeated_runs(PUBLISHED, noise=0.005)
    rows = [dict(r, status="completed", C_convention="6N") for r in runs.to_dict("records")]
    res, fitted = fit_all(runs_table(rows), approaches=(), n_bootstrap=0)
    assert res["data_constrained"]["R_D_star"] == pytest.approx(PUBLISHED["R_D_star"], rel=0.3)
    assert "## Data-constrained law" in markdown(res, [], "repeated") and fitted["data_constrained"].n_points == 56
    once = [r for r in rows if r["epochs"] == 1]  # single-epoch runs only: no section
    res, _ = fit_all(runs_table(once), approaches=(), n_bootstrap=0)
    assert "data_constrained" not in res and "Data-constrained" not in markdown(res, [], "once")

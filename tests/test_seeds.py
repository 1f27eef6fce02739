"""Seed replicates: the planner replicates runs over plan.seeds; analysis groups them into points, estimates the seed
noise, weights the fits by it when it varies, bootstraps points with their seeds and reports the spread."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.checks.seeds import (POINT, W_LOG, has_replicates, pooled_sigma_log, replicate_points, seed_noise,
                                   variance_trend)
from analysis.checks.uncertainty import _resample
from analysis.laws.approach3 import fit_approach3
from analysis.laws.fits import fit_parabola
from analysis.load import load_sweep, usable
from analysis.report.build import fit_all, markdown, write_report
from analysis.synthetic import CHINCHILLA_TRUTH as T
from analysis.synthetic import isoflop_runs, seed_replicates, write_sweep
from scaling.model.decoder import ModelConfig
from scaling.sweep.plan import FamilyRule, HyperRule, SweepSpec, plan_sweep

REPO = Path(__file__).resolve().parent.parent
BASE = ModelConfig(vocab_size=33, seq_len=16)
FAMILY = FamilyRule(head_dim=8, d_model_multiple=8, min_d_model=16, max_d_model=64, aspect_ratio=16)
HYPER = HyperRule(base_batch=8, min_batch=4, max_batch=8, min_steps=20)


def spec(**kw) -> SweepSpec:
    return SweepSpec(**{"budgets": [2e9, 4e9], "n_sizes": 2, "size_step": 2.5, "family": FAMILY, "hyper": HYPER, **kw})


# --------------------------------------------------------------------------------------------------------------------
# Planner
# --------------------------------------------------------------------------------------------------------------------
def test_planner_replicates_every_run_once_per_seed():
    one = plan_sweep(spec(), BASE)
    rep = plan_sweep(spec(seeds=[0, 1, 2]), BASE)
    assert len(rep.runs) == 3 * len(one.runs)
    for i, run in enumerate(one.runs):
        replicates = rep.runs[3 * i:3 * i + 3]  # adjacent, in the order of plan.seeds
        assert [r.name for r in replicates] == [f"{run.name}-s{s}" for s in (0, 1, 2)]
        assert [r.seed for r in replicates] == [0, 1, 2] and run.seed is None
        assert {r.group for r in replicates} == {run.group}  # one group: they may share a vmapped step
        for r in replicates:
            assert r.overrides() == [f"name={r.name}", *run.overrides()[1:], f"train.seed={r.seed}"]
            assert r.tags() == run.tags() + [f"s{r.seed}"]
            diff = {k for k, v in r.manifest().items() if v != run.manifest()[k]}
            assert diff == {"name", "seed"}
    # what differs between replicates is what one vmapped step allows (scaling.train.stack.FREE_FIELDS)
    from scaling.train.stack import FREE_FIELDS

    a, b = (dict(o.split("=", 1) for o in r.overrides()) for r in rep.runs[:2])
    assert {k for k in a if a[k] != b[k]} <= set(FREE_FIELDS)
    # no seeds: the plan of today, name for name
    assert [r.manifest() for r in plan_sweep(spec(seeds=[]), BASE).runs] == [r.manifest() for r in one.runs]


def test_lr_plan_replicates_keep_their_lr_tag_and_shape_group():
    lr = SweepSpec(kind="lr", budgets=[2e9], lrs=[1e-3, 1e-2], hyper=HYPER, seeds=[3, 7])
    plan = plan_sweep(lr, ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=33, seq_len=16))
    assert [r.name for r in plan.runs] == [f"lr-C2e9-d32-L2-B8-lr{x}-s{s}" for x in ("1e-3", "1e-2") for s in (3, 7)]
    assert {r.group for r in plan.runs} == {"lr-C2e9-d32-L2-B8"}
    assert [r.tags()[-2:] for r in plan.runs] == [[f"lr{x}", f"s{s}"] for x in ("1e-3", "1e-2") for s in (3, 7)]


@pytest.mark.parametrize("bad", [[0, 0], [-1], [1.5], [True], ["0"]])
def test_planner_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match=r"plan.seeds=.* is invalid: give distinct non-negative integers, e.g. "
                                         r"plan.seeds=\[0,1,2\]"):
        spec(seeds=bad)


def dry_run(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "scaling.train", "-m", "+experiment=isoflop_tiny", "hydra.sweeper.dry_run=true",
           "hydra.sweeper.plan.n_sizes=2", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_sweeper_takes_plan_seeds_from_the_command_line(tmp_path):
    out = dry_run(tmp_path, "hydra.sweeper.plan.seeds=[0,1]")  # no `+`: the sweeper's plan has the key
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-2000:]
    assert "(isoflop, C in the chinchilla convention): 8 runs" in log
    assert "isoflop-C2e9-d16-L1-B8-s1: " in log and "train.seed=1 " in log
    assert not (tmp_path / "sweep").exists()
    # the plan's seeds and a train.seed override would fight over the seed: refused, naming both
    out = dry_run(tmp_path, "hydra.sweeper.plan.seeds=[0,1]", "train.seed=0,1")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith("error: hydra.sweeper.plan.seeds=[0, 1] and a train.seed override both set the seed")


# --------------------------------------------------------------------------------------------------------------------
# Points and their noise
# --------------------------------------------------------------------------------------------------------------------
def table(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["name", "N", "D", "budget", "lr", "seed", "loss"])


def test_replicates_group_into_points_with_mean_sigma_and_n():
    runs = table([("a0", 1e6, 1e9, 1e16, 1e-3, 0, 3.0), ("a1", 1e6, 1e9, 1e16, 1e-3, 1, 3.2),
                  ("a2", 1e6, 1e9, 1e16, 1e-3, 2, 3.1),
                  ("b0", 2e6, 5e8, 1e16, 1e-3, 0, 2.9), ("b1", 2e6, 5e8, 1e16, 1e-3, 1, 2.95),
                  ("c0", 4e6, 2.5e8, 1e16, 1e-3, 0, 3.05),  # one seed: not replicated
                  ("d0", 1e6, 1e9, 1e16, 3e-3, 0, 3.3), ("d1", 1e6, 1e9, 1e16, 3e-3, 1, 3.3)])  # another lr
    assert has_replicates(runs)
    p = replicate_points(runs)
    p = p.set_index(p["runs"].str[0])  # a point by its first run
    assert p.loc["a0", "runs"] == ["a0", "a1", "a2"]
    a = p.loc["a0"]
    assert (a["n"], a["n_seeds"], a["seeds"], a["replicated"]) == (3, 3, [0, 1, 2], True)
    assert a["loss"] == pytest.approx(3.1) and a["sigma"] == pytest.approx(0.1)  # ddof=1
    assert a["sigma_log"] == pytest.approx(np.std(np.log([3.0, 3.2, 3.1]), ddof=1))
    assert a["rel_sigma"] == pytest.approx(0.1 / 3.1)
    c = p.loc["c0"]
    assert c["n"] == 1 and not c["replicated"] and np.isnan(c["sigma"])
    assert len(p) == 4  # lr 3e-3 is its own point, not a replicate of a
    # pooled: sum (n-1) s^2 / sum (n-1) of log loss over the replicated points (d: sigma 0)
    s = [np.var(np.log(x), ddof=1) for x in ([3.0, 3.2, 3.1], [2.9, 2.95], [3.3, 3.3])]
    pooled, dof = pooled_sigma_log(replicate_points(runs))
    assert dof == 4 and pooled == pytest.approx(np.sqrt((2 * s[0] + s[1] + s[2]) / 4))
    # runs of one point at one seed are not replicates; neither are runs at different points
    assert not has_replicates(table([("a", 1, 1, 1, 1e-3, 0, 3.0), ("b", 1, 1, 1, 1e-3, 0, 3.1)]))
    assert not has_replicates(table([("a", 1, 1, 1, 1e-3, 0, 3.0), ("b", 2, 1, 1, 1e-3, 1, 3.1)]))
    assert seed_noise(table([("a", 1, 1, 1, 1e-3, 0, 3.0), ("b", 2, 1, 1, 1e-3, 1, 3.1)])) is None


def test_seeds_are_read_from_the_records(tmp_path):
    pts = isoflop_runs(noise=0, n_per_budget=3, budgets=(1e17, 1e18))
    sweep = write_sweep(tmp_path / "s", seed_replicates(pts, seeds=(4, 5), sigma=0.01), failed=0, diverged=0)
    points = replicate_points(usable(load_sweep(sweep)))
    assert len(points) == 6 and (points["seeds"].map(tuple) == (4, 5)).all() and points["replicated"].all()


# --------------------------------------------------------------------------------------------------------------------
# Weighted fits
# --------------------------------------------------------------------------------------------------------------------
PTS = isoflop_runs(noise=0, n_per_budget=5, budgets=(1e17, 1e18, 1e19, 1e20))
# Seed noise that falls with compute, 3% of the loss at 1e17 FLOPs to 0.1% at 1e20 (relative sd of the loss)
SIGMA_BY_C = 0.03 * (PTS["budget"].to_numpy() / 1e17) ** -0.5


def param_error(fit) -> float:
    return max(abs(fit.alpha / T["alpha"] - 1), abs(fit.beta / T["beta"] - 1), abs(fit.E / T["E"] - 1))


def test_weighted_approach3_recovers_the_truth_closer_than_unweighted_when_noise_varies():
    unweighted, weighted = [], []
    for seed in range(5):
        noise = seed_noise(seed_replicates(PTS, sigma=SIGMA_BY_C, seed=seed))
        assert noise.weighted and noise.trend.p_value < 1e-3  # the trend in the noise is found
        r = noise.runs
        unweighted.append(param_error(fit_approach3(r["N"], r["D"], r["loss"], n_starts=8)))
        weighted.append(param_error(fit_approach3(r["N"], r["D"], r["loss"], n_starts=8, weights=r[W_LOG])))
    # Measured (seeds 0-4): mean max relative error of alpha, beta, E 0.059 unweighted, 0.030 weighted (ratio 0.51;
    # 0.060 vs 0.032 over 20 seeds); weighted wins 5 of 5 here, 16 of 20 there.
    assert np.mean(weighted) < 0.045
    assert np.mean(weighted) < 0.75 * np.mean(unweighted)


def test_noise_without_a_trend_leaves_the_fits_unweighted():
    noise = seed_noise(seed_replicates(PTS, sigma=0.01, seed=0))
    assert noise.trend.p_value >= 0.05 and not noise.weighted  # (p = 0.44 measured)
    assert (noise.runs["sigma_log"] == noise.pooled_sigma_log).all()
    assert "unweighted" in noise.weighting()
    assert variance_trend(replicate_points(seed_replicates(PTS.iloc[:4], sigma=0.01))) is None  # too few points


def test_uniform_weights_are_the_unweighted_fit_exactly():
    r = seed_replicates(PTS, sigma=0.01, seed=1)
    base = fit_approach3(r["N"], r["D"], r["loss"], n_starts=4)
    assert fit_approach3(r["N"], r["D"], r["loss"], n_starts=4, weights=np.full(len(r), 7.0)) == base
    g = r[r["budget"] == 1e18]
    x = np.log(g["N"].to_numpy())
    assert fit_parabola(x, g["loss"], weights=np.full(len(g), 3.0)) == fit_parabola(x, g["loss"])


def test_one_run_per_point_gives_exactly_the_fits_without_seeds():
    runs = isoflop_runs(noise=0.01, n_per_budget=6, budgets=(1e17, 1e18, 1e19))
    seeded = runs.assign(seed=np.arange(len(runs)) % 3)  # seeds recorded, but every point has one run
    kw = dict(approaches=(2, 3), n_bootstrap=3, n_jobs=1)
    res, _ = fit_all(seeded, **kw)
    assert "seeds" not in res
    assert json.dumps(res, sort_keys=True) == json.dumps(fit_all(runs, **kw)[0], sort_keys=True)


def test_bootstrap_draws_points_with_all_their_seeds():
    noise = seed_noise(seed_replicates(PTS, sigma=0.01, seed=0))
    out = _resample(noise.runs, POINT, "budget", np.random.default_rng(0))
    assert len(out) == len(noise.runs)
    assert (out.groupby(POINT)["seed"].apply(sorted).map(tuple) == (0, 1, 2)).all()


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------
def test_report_on_a_sweep_with_replicates_shows_the_seed_spread(tmp_path):
    pts = isoflop_runs(noise=0, n_per_budget=4, budgets=(1e17, 1e18, 1e19))
    runs = seed_replicates(pts, sigma=0.03 * (pts["budget"].to_numpy() / 1e17) ** -0.5, seed=0)
    runs = runs[runs["name"] != runs["name"].iloc[-1]]  # one point keeps 2 of its 3 seeds
    sweep = write_sweep(tmp_path / "s", runs, failed=0, diverged=0)
    report = write_report(sweep, n_bootstrap=2, n_jobs=1)
    md = report.read_text()
    res = json.loads((report.parent / "results.json").read_text())
    seeds = res["seeds"]
    assert (seeds["n_points"], seeds["n_replicated"], seeds["n_runs"]) == (12, 12, 35)
    assert "## Seed spread" in md and "| N | D | budget C | lr | n | seeds | mean loss | sigma | sigma / mean |" in md
    first = seeds["points"][0]
    assert f"| 3 | 0,1,2 | {first['loss']:.4g} | {first['sigma']:.4g} | {first['rel_sigma']:.2%} |" in md
    assert "| 2 | 0,1 |" in md
    assert f"over the replicated points: {seeds['pooled_sigma_log']:.4g} on {seeds['dof']} degrees of freedom" in md
    assert seeds["weighted"] and "- fits: weighted by 1/sigma^2" in md
    assert "bootstrap over points (each with all its seeds)" in md
    assert (report.parent / "figures" / "isoflops.png").exists()
    # without replicates: no section
    plain, _ = fit_all(pts, approaches=(2,), n_bootstrap=0)
    assert "Seed spread" not in markdown(plain, [], "plain") and "Seed spread" in md

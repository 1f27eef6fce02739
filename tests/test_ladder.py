"""Ladder branches: a run that forks from its parent's checkpoint and cools down (Hägele et al. 2024)."""

import dataclasses
import re

import numpy as np
import pytest

from scaling.record import COLUMNS, record_row
from scaling.train.checkpoint import CheckpointConfig
from scaling.train.loop import train
from scaling.train.tracking import read_metrics
from test_train import tiny_config

TIMING = ("tokens_per_s", "mfu")


def _run(tmp_path, steps, schedule="wsd", **train_kw):
    cfg = tiny_config(tmp_path, steps=steps, **train_kw)
    cfg.optim = dataclasses.replace(cfg.optim, schedule=schedule, decay_fraction=0.25, warmup_steps=2)
    return cfg


def _parent(tmp_path, steps=12, keep=(8, 12)):
    cfg = _run(tmp_path, steps, schedule="constant", checkpoint=CheckpointConfig(every=100, keep=1, keep_steps=list(keep)))
    cfg.name = "parent"
    return cfg


def _branch(tmp_path, steps, at, parent="parent", **optim):
    cfg = _run(tmp_path, steps, parent=parent, branch_step=at)
    cfg.optim = dataclasses.replace(cfg.optim, **optim)
    cfg.name = f"branch{steps}"
    return cfg


def _rows(run_dir, after):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(run_dir / "metrics.jsonl")
            if m["step"] > after]


def test_branch_equals_the_ordinary_wsd_run_to_its_length_bit_for_bit(tmp_path):
    parent = train(_parent(tmp_path), tmp_path / "sweep" / "parent")
    assert parent["status"] == "completed" and parent["branch_points"] == [8, 12]
    kept = sorted(int(p.name) for p in (tmp_path / "sweep" / "parent" / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [8, 12]  # branch points kept for good (keep=1 alone would keep only 12)

    for steps, at in [(16, 12), (11, 8)]:  # wsd 25% cooldown: the stable phase ends at round(0.75 * steps)
        ordinary = train(_run(tmp_path, steps), tmp_path / f"ordinary{steps}")
        branch = train(_branch(tmp_path, steps, at), tmp_path / "sweep" / f"branch{steps}")
        assert branch["status"] == "completed"
        for key in ("loss", "train_loss"):
            assert np.asarray(branch[key]).tobytes() == np.asarray(ordinary[key]).tobytes(), key
        assert _rows(tmp_path / "sweep" / f"branch{steps}", at) == _rows(tmp_path / f"ordinary{steps}", at)
        assert min(m["step"] for m in read_metrics(tmp_path / "sweep" / f"branch{steps}" / "metrics.jsonl")) > at
        # the same point of the law (D, C), a fraction of the cost
        assert (branch["D"], branch["C"]) == (ordinary["D"], ordinary["C"])
        assert branch["C_spent"] == pytest.approx(ordinary["C"] * (steps - at) / steps, rel=1e-12)
        assert branch["branch"] == {"parent": "parent", "step": at, "tokens": at * 8 * 16}
        row = record_row(branch, tmp_path / "sweep" / f"branch{steps}")
        assert set(row) == set(COLUMNS) and (row["parent"], row["branch_step"]) == ("parent", at)
        assert record_row(ordinary, "x")["C_spent"] == ordinary["C"] and record_row(ordinary, "x")["parent"] is None


def test_branch_relaunch_resumes_its_own_checkpoint_not_the_parent(trained_parent, tmp_path, caplog):
    cfg = _branch(trained_parent, 16, 12, parent=str(trained_parent / "parent"))
    cfg.train.checkpoint = CheckpointConfig(every=14, keep=2)
    first = train(cfg, tmp_path / "branch")
    (tmp_path / "branch" / "record.json").unlink()  # as if killed after its last checkpoint
    with caplog.at_level("INFO", logger="scaling.train.loop"):
        again = train(cfg, tmp_path / "branch")
    assert "resuming" in caplog.text and "forking" not in caplog.text
    assert np.asarray(again["loss"]).tobytes() == np.asarray(first["loss"]).tobytes()


@pytest.fixture(scope="module")
def trained_parent(tmp_path_factory):
    base = tmp_path_factory.mktemp("ladder")
    train(_parent(base), base / "parent")
    return base


@pytest.mark.parametrize("change, message", [
    (dict(branch_step=14), "beyond the last step 12 of the parent"),
    (dict(optim=dict(decay_fraction=0.5)), "learning rate differs from its parent's at step 9"),
    (dict(optim=dict(warmup_steps=3)), "learning rate differs from its parent's at step 1"),
    (dict(optim=dict(lr=2e-2)), "differs from its parent parent in optim.lr"),
    (dict(model=dict(d_model=64, n_heads=4)), "differs from its parent parent in model"),
    (dict(parent="nowhere"), "holds no run (config.json is missing)"),
    (dict(branch_step=4), "has no checkpoint of step 4 (it has steps [8, 12])"),
])
def test_bad_branches_are_refused_with_the_fix(trained_parent, tmp_path, change, message):
    # the branch reads the module's parent in place (absolute train.parent); only its own run dir is per test
    cfg = _branch(trained_parent, 16, change.get("branch_step", 12), parent=str(trained_parent / change.get("parent", "parent")),
                  **change.get("optim", {}))
    if "model" in change:
        cfg.model = dataclasses.replace(cfg.model, **change["model"])
    with pytest.raises(ValueError, match=re.escape(message)):
        train(cfg, tmp_path / "branch")
    assert not (tmp_path / "branch" / "checkpoints").exists() or not any((tmp_path / "branch" / "checkpoints").iterdir())


def test_branch_of_a_diverged_parent_says_so(tmp_path):
    cfg = _parent(tmp_path)
    cfg.optim = dataclasses.replace(cfg.optim, lr=1e4)  # diverges within a few steps, before step 8
    parent = train(cfg, tmp_path / "parent")
    assert parent["status"] == "diverged"
    branch = _branch(tmp_path, 16, 12, lr=1e4)
    with pytest.raises(ValueError, match="parent parent diverged before leaving a checkpoint of step 12"):
        train(branch, tmp_path / "branch")


def test_branch_config_errors():
    from scaling.config import TrainConfig, resolve_budget
    from scaling.model.decoder import ModelConfig

    with pytest.raises(ValueError, match="a branch needs both"):
        TrainConfig(steps=10, parent="p")
    with pytest.raises(ValueError, match="train.branch_step=0 is invalid"):
        TrainConfig(steps=10, parent="p", branch_step=0)
    with pytest.raises(ValueError, match="not before the run's last step 10"):
        resolve_budget(ModelConfig(), TrainConfig(steps=10, parent="p", branch_step=10))


# --------------------------------------------------------------------------------------------------------------------
# The ladder plan (pure) and its schedule
# --------------------------------------------------------------------------------------------------------------------
def _ladder_plan(**kw):
    from scaling.model.decoder import ModelConfig
    from scaling.sweep.plan import SweepSpec, plan_sweep

    spec = dict(kind="ladder", budgets=[2e9, 4e9], n_sizes=2, size_step=2.5,
                family={"head_dim": 8, "d_model_multiple": 8, "min_d_model": 16, "max_d_model": 64, "aspect_ratio": 16},
                hyper={"base_lr": 1e-2, "base_d_model": 32, "base_batch": 8, "min_batch": 4, "max_batch": 8,
                       "min_steps": 20})
    return plan_sweep(SweepSpec(**{**spec, **kw}), ModelConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=33, seq_len=16))


def test_ladder_plan_has_one_parent_per_shape_reaching_every_branch_point():
    from scaling.config import TrainConfig, resolve_budget
    from scaling.model.decoder import ModelConfig

    plan = _ladder_plan()
    parents = {r.name: r for r in plan.runs if r.role == "parent"}
    branches = [r for r in plan.runs if r.role == "branch"]
    assert len(parents) == 2 and len(branches) == 4  # 2 shapes on both budget lines
    for b in branches:
        p = parents[b.parent]
        assert (b.d_model, b.n_layers, b.batch_size, b.lr, b.warmup_steps) == (p.d_model, p.n_layers, p.batch_size, p.lr, p.warmup_steps)
        assert b.branch_step == round(0.8 * b.steps) and b.branch_step in p.keep_steps
        assert b.schedule == "wsd" and b.decay_fraction == 0.2 and abs(b.budget_error) <= 0.02
        shape = ModelConfig(d_model=b.d_model, n_layers=b.n_layers, n_heads=b.n_heads, d_ff=b.d_ff, vocab_size=33, seq_len=16)
        assert resolve_budget(shape, TrainConfig(batch_size=b.batch_size, flops=b.nominal)).steps == b.steps
    for p in parents.values():
        assert p.schedule == "constant" and p.steps == max(p.keep_steps)
        assert p.warmup_steps == round(0.05 * min(b.steps for b in branches if b.parent == p.name))
    overrides = " ".join(branches[0].overrides())
    assert f"train.parent={branches[0].parent} train.branch_step={branches[0].branch_step}" in overrides
    assert "optim.schedule=wsd" in overrides and "optim.decay_shape=linear" in overrides
    assert f"train.checkpoint.keep_steps=[{','.join(map(str, parents[branches[0].parent].keep_steps))}]" in " ".join(
        parents[branches[0].parent].overrides())


def test_fixed_warmup_steps_apply_to_every_ladder_run_and_to_plain_runs():
    from scaling.sweep.plan import HyperRule

    hyper = {"base_lr": 1e-2, "base_d_model": 32, "base_batch": 8, "min_batch": 4, "max_batch": 8, "min_steps": 20,
             "warmup_steps": 9}
    plan = _ladder_plan(hyper=hyper)
    assert plan.runs and {r.warmup_steps for r in plan.runs} == {9}
    assert all("optim.warmup_steps=9" in r.overrides() for r in plan.runs)
    # a plain IsoFLOP plan of the same rule: its runs warm up for the same 9 steps, however long each is
    iso = _ladder_plan(kind="isoflop", hyper=hyper)
    assert len({r.steps for r in iso.runs}) > 1 and {r.warmup_steps for r in iso.runs} == {9}
    # a warmup reaching past a short branch's fork skips that branch, with the reason
    late = _ladder_plan(hyper={**hyper, "warmup_steps": 10_000})
    assert not late.runs and all("inside the warmup (10000 steps)" in s["reason"] for s in late.skipped)
    with pytest.raises(ValueError, match=r"hyper.warmup_steps=-1 is invalid: use a non-negative integer"):
        HyperRule(warmup_steps=-1)


def test_a_branch_too_short_for_min_steps_is_skipped_alone_and_the_rest_of_its_ladder_kept():
    hyper = {"base_lr": 1e-2, "base_d_model": 32, "base_batch": 8, "min_batch": 8, "max_batch": 8, "min_steps": 20}
    full = _ladder_plan(hyper=hyper)
    low = {r.name: r.steps for r in full.runs if r.role == "branch" and r.budget == 2e9}
    cut = min(low.values()) + 1  # the shortest branch at 2e9 falls below min_steps, its 4e9 sibling does not
    plan = _ladder_plan(hyper={**hyper, "min_steps": cut})
    short = min(low, key=low.get)
    assert short not in {r.name for r in plan.runs}
    assert [s for s in plan.skipped if short.startswith(s["target"])][0]["reason"] == (
        f"only {cut - 1} steps at the minimum batch 8 (< hyper.min_steps={cut})")
    assert len([r for r in plan.runs if r.role == "branch"]) == len([r for r in full.runs if r.role == "branch"]) - 1
    assert {r.parent for r in plan.runs if r.role == "branch"} == {r.name for r in plan.runs if r.role == "parent"}


def test_ladder_plan_grid_form_and_seed_replicates_fork_from_their_own_parent():
    plan = _ladder_plan(budgets=[], sizes=[3e3], tokens=[5e4, 1e5, 2e5], seeds=[0, 1], cooldown_shape="1-sqrt")
    branches = [r for r in plan.runs if r.role == "branch"]
    assert len(branches) == 6 and all(r.decay_shape == "1-sqrt" for r in branches)
    for b in branches:
        assert b.parent.endswith(f"-s{b.seed}") and b.name.endswith(f"-s{b.seed}")
    assert {r.name for r in plan.runs if r.role == "parent"} == {b.parent for b in branches}


def test_shared_sizes_put_each_shape_on_every_budget_line_its_window_holds():
    budgets = [2e9, 2.83e9, 4e9, 5.66e9, 8e9]
    kw = dict(budgets=budgets, n_sizes=3, size_step=1.6, prior_fit=[1e-2, 0.7],
              family={"head_dim": 4, "d_model_multiple": 4, "min_d_model": 4, "max_d_model": 256, "min_layers": 1,
                      "max_layers": 1, "aspect_ratio": 1000},
              hyper={"base_lr": 1e-2, "base_d_model": 32, "base_batch": 4, "min_batch": 4, "max_batch": 4,
                     "min_steps": 1})
    own, shared = _ladder_plan(**kw), _ladder_plan(**kw, shared_sizes=True)
    for plan in (own, shared):  # each budget keeps its 3 sizes, one branch each
        assert sorted(r.budget for r in plan.runs if r.role == "branch") == sorted(budgets * 3)
    parents = lambda plan: [r for r in plan.runs if r.role == "parent"]
    # budgets sqrt(2) apart move N_opt by 1.27x, less than the grid's 1.6: with shared sizes the lines reuse shapes
    assert len(parents(shared)) < len(parents(own))
    assert max(len(p.keep_steps) for p in parents(shared)) >= 3
    # the shared grid: neighbouring targets 1.6x apart, and every target one of anchor * 1.6^k
    targets = sorted({r.target_N for r in shared.runs if r.role == "branch"})
    k = np.log(np.array(targets) / targets[0]) / np.log(1.6)
    assert np.allclose(k, np.round(k)) and np.all(np.diff(np.round(k)) == 1)
    spent = lambda plan: sum(r.C["chinchilla"] * ((r.steps - r.branch_step) / r.steps if r.role == "branch" else 1)
                             for r in plan.runs)
    assert spent(shared) < spent(own)


@pytest.mark.parametrize("kw, message", [
    (dict(kind="isoflop", shared_sizes=True), "plan.shared_sizes=true applies to plan.kind=ladder only"),
    (dict(budgets=[], sizes=[3e3], tokens=[1e5], shared_sizes=True), "plan.shared_sizes=true draws each budget's"),
    (dict(cooldown_fraction=1.0), "plan.cooldown_fraction=1.0 is invalid"),
    (dict(cooldown_shape="cosine"), "plan.cooldown_shape='cosine' is unknown"),
    (dict(sizes=[3e3], tokens=[1e5]), "a ladder needs exactly one of plan.budgets"),
    (dict(budgets=[], sizes=[3e3]), "needs exactly one of plan.tokens"),
])
def test_ladder_plan_errors(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _ladder_plan(**kw)


def test_schedule_launches_branches_after_everything_else_and_never_groups_ladders():
    from scaling.sweep.schedule import expand_jobs, schedule

    jobs = expand_jobs(_ladder_plan(seeds=[0, 1]), "s", [])
    same = {j.name: "one key" for j in jobs}  # as if every run could share a vmapped step
    s = schedule(jobs, {}, same)
    assert not s.grouped and {j.run.role for j in s.singles} == {"parent"} and {j.run.role for j in s.branches} == {"branch"}
    assert s.n_runs == len(jobs) == 12
    done = {j.name: "completed" for j in jobs if j.run.role == "parent"}
    s = schedule(jobs, done, same)
    assert not s.singles and len(s.branches) == 8 and len(s.finished) == 4


def test_a_cooldown_shape_on_the_command_line_is_refused_and_the_plans_reaches_every_branch(tmp_path):
    import subprocess

    def dry_run(*overrides):
        cmd = [*_sweep_cmd(tmp_path / "sweep"), "hydra.sweeper.dry_run=true", *overrides]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    # optim.decay_shape reached the parents (constant lr, no cooldown) and the plan's linear replaced it on every branch
    out = dry_run("optim.decay_shape=1-sqrt")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert re.fullmatch(r"error: sweep 'ladder_tiny': the plan sets these keys for its runs and would replace the command "
                        r"line's values: optim\.decay_shape=1-sqrt \(run ladder-\S+ gets linear; set "
                        r"hydra\.sweeper\.plan\.cooldown_shape instead\)\. Drop them from the command line\.\n",
                        out.stderr), out.stderr[-2000:]
    out = dry_run("+hydra.sweeper.plan.cooldown_shape=1-sqrt")
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("  ladder-")]
    branches = [line for line in jobs if "train.parent=" in line]
    assert len(branches) == 4 and all("optim.decay_shape=1-sqrt" in line for line in branches)
    assert not (tmp_path / "sweep").exists()


# --------------------------------------------------------------------------------------------------------------------
# A ladder sweep through Hydra: waves, the FLOPs it spent, kill -9 and relaunch
# --------------------------------------------------------------------------------------------------------------------
def _sweep_cmd(sweep_dir):
    import sys

    return [sys.executable, "-m", "scaling.train", "-m", "+experiment=ladder_tiny", f"hydra.sweep.dir={sweep_dir}",
            f"data.cache_dir={sweep_dir.parent / 'cache'}"]


def _launch_until(sweep_dir, log, done):
    """Starts the sweep and kills it (-9, its whole process group) once `done()` holds; False if it finished first."""
    import os
    import signal
    import subprocess
    import time

    with open(log, "w") as out:
        proc = subprocess.Popen(_sweep_cmd(sweep_dir), cwd=sweep_dir.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        while proc.poll() is None:
            if done():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.2)
    return False


@pytest.mark.slow
def test_ladder_sweep_kill_9_and_relaunch_retrains_nothing_finished(tmp_path):
    import json
    import subprocess

    sweep = tmp_path / "sweep"
    parent = sweep / "ladder-d16-L1-B8"
    mid_parent = lambda: (parent / "checkpoints" / "300").is_dir() and not (parent / "record.json").exists()  # noqa: E731
    assert _launch_until(sweep, tmp_path / "1.log", mid_parent), (tmp_path / "1.log").read_text()[-3000:]

    first_branch = sweep / "ladder-C2e9-d16-L1-B8" / "record.json"
    assert _launch_until(sweep, tmp_path / "2.log", first_branch.exists), (tmp_path / "2.log").read_text()[-3000:]
    assert "resuming" in (parent / "train.log").read_text()  # the parent went on from its checkpoint, not from 0
    finished = {p.parent.name: p.read_text() for p in sweep.glob("*/record.json")}
    assert "ladder-C2e9-d16-L1-B8" in finished and "ladder-d24-L2-B8" in finished

    out = subprocess.run(_sweep_cmd(sweep), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{6 - len(finished)} runs to launch, {len(finished)} already finished" in out.stderr + out.stdout
    for name, text in finished.items():  # nothing finished was retrained
        assert (sweep / name / "record.json").read_text() == text, name
    recs = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/record.json")}
    assert len(recs) == 6 and all(r["status"] == "completed" for r in recs.values())
    # the sweep prints what it spent beside the sum of its points' C
    spent = sum(r["C_spent"] for r in recs.values())
    points = sum(r["C"] for r in recs.values() if not r.get("branch_points"))
    assert spent < 0.75 * points
    assert f"FLOPs spent {spent:.4g} (chinchilla); sum of C over its 4 points {points:.4g}" in out.stderr + out.stdout


# --------------------------------------------------------------------------------------------------------------------
# The same ladder sweep under the parallel launchers (joblib here; SLURM through submitit in test_sweep.py)
# --------------------------------------------------------------------------------------------------------------------
def launch_ladder(sweep_dir, *overrides: str) -> str:
    """Runs `+experiment=ladder_tiny` (2 parents, 4 branches) to its end; returns what it printed."""
    import subprocess

    out = subprocess.run(_sweep_cmd(sweep_dir) + list(overrides), cwd=sweep_dir.parent, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"sweep failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def check_ladder_sweep(sweep_dir, printed: str) -> dict:
    """Asserts that every planned run of a ladder sweep completed and each branch forked from its parent's checkpoint,
    launched only once the parent had finished; returns the records by run name."""
    import json

    planned = {p["name"]: p for p in json.loads((sweep_dir / "sweep.json").read_text())["planned"]}
    recs = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/record.json")}
    assert set(recs) == set(planned) and len(planned) == 6, (sorted(recs), sorted(planned))
    assert all(r["status"] == "completed" for r in recs.values()), {n: r["status"] for n, r in recs.items()}
    branches = {n: p for n, p in planned.items() if p["role"] == "branch"}
    assert len(branches) == 4 and {p["parent"] for p in branches.values()} == {n for n, p in planned.items()
                                                                               if p["role"] == "parent"}
    for name, p in branches.items():
        b, run, parent = p["branch_step"], sweep_dir / name, sweep_dir / p["parent"]
        row = record_row(recs[name], run)
        assert (row["role"], row["parent"], row["branch_step"]) == ("branch", p["parent"], b), name
        assert b in recs[p["parent"]]["branch_points"] and (parent / "checkpoints" / str(b)).is_dir(), name
        assert re.search(rf"forking \S*{re.escape(name)} from step {b}\n", (run / "train.log").read_text()), name
        assert min(m["step"] for m in read_metrics(run / "metrics.jsonl")) > b, name
        # the branch's job started (Hydra wrote its config) after its parent's run had written its final record
        assert (run / ".hydra" / "config.yaml").stat().st_mtime_ns >= (parent / "record.json").stat().st_mtime_ns, name
    spent = sum(r["C_spent"] for r in recs.values())
    points = sum(recs[n]["C"] for n in branches)
    assert spent < 0.75 * points  # the branches share their parents' stable phase
    assert f"FLOPs spent {spent:.4g} (chinchilla); sum of C over its 4 points {points:.4g}" in printed
    return recs


@pytest.mark.slow
def test_ladder_sweep_under_joblib_launches_each_branch_after_its_parent(tmp_path):
    printed = launch_ladder(tmp_path / "sweep", "hydra/launcher=joblib_cpu", "hydra.launcher.n_jobs=2")
    assert "Joblib.Parallel(n_jobs=2" in printed
    check_ladder_sweep(tmp_path / "sweep", printed)

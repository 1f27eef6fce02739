"""Sweeps end to end through Hydra (plan sweeper + basic / joblib launchers), relaunch, failure isolation, collect."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from scaling.model.decoder import ModelConfig
from scaling.sweep.plan import SweepSpec, plan_sweep
from scaling.record import COLUMNS
from scaling.sweep.schedule import collect, expand_jobs, main as sweep_main, merge_overrides, parse_vmap, schedule

REPO = Path(__file__).resolve().parent.parent
# 2 budgets x 2 sizes of tiny models on the synthetic source (configs/experiment/isoflop_tiny.yaml): ~4 x 5 s.
SMALL = ["+experiment=isoflop_tiny", "hydra.sweeper.plan.n_sizes=2"]
NAMES = {"isoflop-C2e9-d16-L1-B8", "isoflop-C2e9-d24-L2-B8", "isoflop-C4e9-d16-L1-B8", "isoflop-C4e9-d24-L2-B8"}


def launch(sweep_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "scaling.train", "-m", *SMALL, f"hydra.sweep.dir={sweep_dir}",
           f"data.cache_dir={sweep_dir.parent / 'cache'}", *overrides]
    env = {**os.environ, "SCALING_CACHE": str(sweep_dir.parent / "cache")}
    out = subprocess.run(cmd, cwd=sweep_dir.parent, capture_output=True, text=True, env=env, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"sweep failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def records(sweep_dir: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.rglob("record.json")}


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("basic") / "sweep"
    launch(sweep_dir)
    return sweep_dir


def test_basic_launcher_writes_one_record_per_planned_run(basic_sweep):
    recs = records(basic_sweep)
    assert set(recs) == NAMES
    manifest = json.loads((basic_sweep / "sweep.json").read_text())
    assert {p["name"] for p in manifest["planned"]} == NAMES
    assert manifest["name"] == "isoflop_tiny" and manifest["rule"]["family"]["head_dim"] == 8
    assert manifest["git_commit"] is None or len(manifest["git_commit"]) == 40
    for name, rec in recs.items():
        assert rec["status"] == "completed" and rec["sweep"] == "isoflop_tiny"
        planned = next(p for p in manifest["planned"] if p["name"] == name)
        assert rec["budget"] == {"kind": "flops", "value": planned["budget"], "convention": "chinchilla"}
        assert (rec["N"], rec["D"], rec["steps"]) == (planned["N"], planned["D"], planned["steps"])
        assert abs(rec["C"] / planned["budget"] - 1) <= 0.02
        # wandb grouping: one group per sweep, tags for budget and size
        logging_cfg = json.loads((basic_sweep / name / "config.json").read_text())["logging"]
        assert logging_cfg["group"] == "isoflop_tiny"
        assert f"d{rec['model']['d_model']}-L{rec['model']['n_layers']}" in logging_cfg["tags"]
        assert any(t.startswith("C2e9") or t.startswith("C4e9") for t in logging_cfg["tags"])


def test_relaunch_trains_nothing_and_resumes_a_partial_run(basic_sweep):
    stamps = {p: p.stat().st_mtime_ns for p in basic_sweep.rglob("*.jsonl")}
    out = launch(basic_sweep)
    assert "0 runs to launch, 4 already finished" in out.stdout + out.stderr
    assert {p: p.stat().st_mtime_ns for p in basic_sweep.rglob("*.jsonl")} == stamps

    # An interrupted run (checkpoints, no record) resumes from its last checkpoint; the others stay untouched.
    partial = basic_sweep / "isoflop-C4e9-d16-L1-B8"
    (partial / "record.json").unlink()
    checkpoints = sorted((partial / "checkpoints").iterdir(), key=lambda p: int(p.name))
    subprocess.run(["rm", "-r", str(checkpoints[-1])], check=True)  # killed before its final checkpoint
    out = launch(basic_sweep)
    log = out.stdout + out.stderr
    assert "1 runs to launch, 3 already finished" in log
    assert f"from step {checkpoints[-2].name}" in log
    assert records(basic_sweep)["isoflop-C4e9-d16-L1-B8"]["status"] == "completed"
    others = {p: m for p, m in stamps.items() if partial not in p.parents}
    assert {p: p.stat().st_mtime_ns for p in others} == others


def test_collect_writes_one_row_per_run_with_contract_columns(basic_sweep, tmp_path, capsys):
    out = tmp_path / "runs.csv"
    assert sweep_main(["collect", str(basic_sweep), "-o", str(out)]) == 0
    df = pd.read_csv(out)
    assert set(df["name"]) == NAMES and (df["status"] == "completed").all()
    assert list(df.columns) == COLUMNS  # scaling.record's run-table columns, in order
    assert (df["budget_convention"] == "chinchilla").all() and (df["C_convention"] == "chinchilla").all()
    for col in ("N", "N_total", "D", "C", "C_6N", "C_kaplan", "C_chinchilla", "loss", "budget", "sweep", "d_model",
                "n_layers", "n_heads", "lr", "tokens_per_s", "schema_version"):
        assert df[col].notna().all(), col
    recs = records(basic_sweep)
    for _, row in df.iterrows():
        rec = recs[row["name"]]
        assert row["C_kaplan"] == pytest.approx(rec["C_kaplan"]) and row["loss"] == pytest.approx(rec["loss"])
        assert row["budget"] == rec["budget"]["value"] and row["lr"] == pytest.approx(rec["optim"]["lr"])
    assert "wrote 4 rows" in capsys.readouterr().out


def test_collect_lists_missing_runs_and_refuses_corrupt_records(tmp_path, basic_sweep, capsys):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(basic_sweep), str(copy)], check=True)
    subprocess.run(["rm", "-r", str(copy / "isoflop-C2e9-d24-L2-B8")], check=True)
    df = collect(copy)
    assert df.set_index("name").loc["isoflop-C2e9-d24-L2-B8", "status"] == "missing"
    (copy / "isoflop-C2e9-d16-L1-B8" / "record.json").write_text("{not json")
    assert sweep_main(["collect", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "isoflop-C2e9-d16-L1-B8/record.json is not a readable run record (not valid JSON" in err
    assert "--skip-corrupt" in err
    assert not (copy / "runs.csv").exists()  # nothing half-written
    assert collect(copy, skip_corrupt=True).set_index("name").loc["isoflop-C2e9-d16-L1-B8", "status"] == "corrupt"
    with pytest.raises(ValueError, match="does not exist"):
        collect(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no record.json"):
        collect(tmp_path / "empty")


def test_joblib_launcher_runs_the_sweep_in_parallel_processes(tmp_path):
    sweep_dir = tmp_path / "sweep"
    out = launch(sweep_dir, "hydra/launcher=joblib_cpu", "hydra.launcher.n_jobs=2", "hydra.sweeper.plan.budgets=[2e9]")
    recs = records(sweep_dir)
    assert set(recs) == {"isoflop-C2e9-d16-L1-B8", "isoflop-C2e9-d24-L2-B8"}
    assert all(r["status"] == "completed" for r in recs.values())
    assert "Joblib.Parallel(n_jobs=2" in out.stdout + out.stderr


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_joblib_workers_exit_when_their_sweep_is_killed_with_sigkill(tmp_path):
    """kill -9 of a joblib sweep's main process used to leave its loky workers training their runs to the end
    (holding their cores' locks); now they exit within seconds, and their runs stay resumable (no final record)."""
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "scaling.train", "-m", *SMALL, f"hydra.sweep.dir={sweep_dir}",
           f"data.cache_dir={tmp_path / 'cache'}", "hydra/launcher=joblib_cpu", "hydra.launcher.n_jobs=2",
           "hydra.sweeper.plan.budgets=[1e11]", "logging.log_every=1"]  # minutes of training per run
    main = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "SCALING_CACHE": str(tmp_path / "cache")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any(p.stat().st_size for p in sweep_dir.rglob("metrics.jsonl")):
            time.sleep(0.5)
        workers = [c for c in _children(main.pid) if b"popen_loky" in (Path("/proc") / str(c) / "cmdline").read_bytes()]
        assert workers, "the sweep started no loky worker that trains"
    finally:
        main.kill()
        main.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.5)
    assert not any(_alive(w) for w in workers), "a worker outlived its killed sweep"
    assert not list(sweep_dir.rglob("record.json"))  # interrupted, not finished: a relaunch resumes them


def test_a_failing_run_is_recorded_and_the_others_complete(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # An injected failure: a vocabulary smaller than the data's makes that one run fail inside the trainer.
    out = launch(sweep_dir, "hydra.sweeper.plan.budgets=[2e9]",
                 "++hydra.sweeper.run_overrides={isoflop-*-d16-*:['model.vocab_size=8']}", check=False)
    assert out.returncode != 0  # the sweep says something failed, after every run had its go
    assert "1 of 2 runs failed" in out.stderr
    recs = records(sweep_dir)
    assert recs["isoflop-C2e9-d16-L1-B8"]["status"] == "failed"
    assert "vocab" in recs["isoflop-C2e9-d16-L1-B8"]["error"]
    assert recs["isoflop-C2e9-d24-L2-B8"]["status"] == "completed"


def test_a_run_refused_at_start_is_recorded_failed_and_a_corrected_relaunch_trains_it(tmp_path):
    sweep_dir = tmp_path / "sweep"
    out = launch(sweep_dir, "hydra.sweeper.plan.budgets=[2e9]",
                 "++hydra.sweeper.run_overrides={isoflop-*-d16-*:['train.eval_every=0']}", check=False)
    assert out.returncode != 0 and "1 of 2 runs failed" in out.stderr
    bad = sweep_dir / "isoflop-C2e9-d16-L1-B8"
    rec = json.loads((bad / "record.json").read_text())
    assert (rec["status"], rec["phase"]) == ("failed", "start") and "train.eval_every=0 is invalid" in rec["error"]
    assert not (bad / "config.json").exists()  # nothing of the refused config is kept to block the corrected one
    df = collect(sweep_dir)
    assert dict(zip(df["name"], df["status"])) == {"isoflop-C2e9-d16-L1-B8": "failed", "isoflop-C2e9-d24-L2-B8": "completed"}
    assert launch(sweep_dir, "hydra.sweeper.plan.budgets=[2e9]").returncode == 0
    assert records(sweep_dir)["isoflop-C2e9-d16-L1-B8"]["status"] == "completed"


# ---------------------------------------------------------------------------------------------------------------
# learning-rate sweeps (configs/experiment/lr_tiny.yaml): one job per same-shape group, scaling.train.stack.train_group
# ---------------------------------------------------------------------------------------------------------------
LRS = {"lr-C2e9-d32-L2-B8-lr1e-3": 1e-3, "lr-C2e9-d32-L2-B8-lr3e-3": 3e-3, "lr-C2e9-d32-L2-B8-lr1e-2": 1e-2,
       "lr-C2e9-d32-L2-B8-lr3e-2": 3e-2}


def launch_lr(sweep_dir: Path, *overrides: str, cache: Path | None = None) -> str:
    cache = cache or sweep_dir.parent / "cache"
    cmd = [sys.executable, "-m", "scaling.train", "-m", "+experiment=lr_tiny", f"hydra.sweep.dir={sweep_dir}",
           f"data.cache_dir={cache}", *overrides]
    env = {**os.environ, "SCALING_CACHE": str(cache)}
    out = subprocess.run(cmd, cwd=sweep_dir.parent, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, f"sweep failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory) -> tuple[Path, str]:
    sweep_dir = tmp_path_factory.mktemp("lr") / "sweep"
    return sweep_dir, launch_lr(sweep_dir, "hydra.sweeper.vmap=true")  # the vmapped step even on CPU


def test_lr_sweep_trains_its_group_in_one_vmapped_job(lr_sweep):
    sweep_dir, log = lr_sweep
    assert "4 runs to launch, 0 already finished (skipped), in 1 jobs" in log and "Launching 1 jobs" in log
    recs = records(sweep_dir)
    assert set(recs) == set(LRS)
    for name, rec in recs.items():
        assert rec["status"] == "completed" and rec["optim"]["lr"] == LRS[name] and rec["sweep"] == "lr_tiny"
        assert rec["vmap_group"]["K"] == 4
    assert sorted(r["vmap_group"]["index"] for r in recs.values()) == [0, 1, 2, 3]
    assert len({(r["N"], r["D"], r["steps"], r["batch_size"]) for r in recs.values()}) == 1
    assert len({r["loss"] for r in recs.values()}) == 4
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert manifest["kind"] == "lr" and manifest["vmap"] == "true"
    assert {p["name"]: p["lr"] for p in manifest["planned"]} == LRS
    assert {p["job_group"] for p in manifest["planned"]} == {"lr-C2e9-d32-L2-B8-lr1e-3"}


def test_lr_sweep_relaunch_trains_nothing_then_only_the_unfinished_member(lr_sweep, tmp_path):
    sweep_dir, _ = lr_sweep
    copy = tmp_path / "sweep"
    subprocess.run(["cp", "-r", str(sweep_dir), str(copy)], check=True)
    stamps = {p: p.stat().st_mtime_ns for p in copy.rglob("*.json*")}
    cache = sweep_dir.parent / "cache"  # the runs' config names the cache; a relaunch must be the same config
    log = launch_lr(copy, "hydra.sweeper.vmap=true", cache=cache)
    assert "0 runs to launch, 4 already finished" in log and "Launching" not in log
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*.json*") if p.name != "sweep.json"} == \
        {p: t for p, t in stamps.items() if p.name != "sweep.json"}
    # A group with one unfinished member: the job trains that member alone, as a plain run (the K = 1 case of the one
    # loop: no vmap_group, its own checkpoints), the others stay untouched.
    (copy / "lr-C2e9-d32-L2-B8-lr3e-3" / "record.json").unlink()
    log = launch_lr(copy, "hydra.sweeper.vmap=true", cache=cache)
    assert "1 runs to launch, 3 already finished (skipped), in 1 jobs" in log
    recs = records(copy)
    assert "vmap_group" not in recs["lr-C2e9-d32-L2-B8-lr3e-3"]
    assert (copy / "lr-C2e9-d32-L2-B8-lr3e-3" / "checkpoints").is_dir()
    assert recs["lr-C2e9-d32-L2-B8-lr3e-3"]["optim"]["lr"] == 3e-3
    assert recs["lr-C2e9-d32-L2-B8-lr1e-3"]["vmap_group"]["K"] == 4


def test_lr_sweep_collect_gives_one_row_per_run(lr_sweep, tmp_path):
    sweep_dir, _ = lr_sweep
    out = tmp_path / "runs.csv"
    assert sweep_main(["collect", str(sweep_dir), "-o", str(out)]) == 0
    df = pd.read_csv(out)
    assert len(df) == 4 and dict(zip(df["name"], df["lr"])) == LRS and (df["status"] == "completed").all()
    assert (df["budget"] == 2e9).all() and df["loss"].notna().all()


def test_lr_sweep_auto_on_cpu_trains_the_group_one_run_after_another(tmp_path):
    sweep_dir = tmp_path / "sweep"
    log = launch_lr(sweep_dir, "hydra.sweeper.plan.lrs=[3e-3,1e-2]")  # vmap=auto, the experiment's default
    assert "2 runs to launch, 0 already finished (skipped), in 1 jobs" in log
    recs = records(sweep_dir)
    assert {n: r["optim"]["lr"] for n, r in recs.items()} == {"lr-C2e9-d32-L2-B8-lr3e-3": 3e-3, "lr-C2e9-d32-L2-B8-lr1e-2": 1e-2}
    assert all(r["status"] == "completed" and "vmap_group" not in r for r in recs.values())  # scaling.train.loop.train
    assert all((sweep_dir / n / "checkpoints").is_dir() for n in recs)


# ---------------------------------------------------------------------------------------------------------------
# expand_jobs without Hydra
# ---------------------------------------------------------------------------------------------------------------
def small_plan():
    from scaling.sweep.plan import FamilyRule, HyperRule

    spec = SweepSpec(budgets=[2e9], n_sizes=2, size_step=2.5,
                     family=FamilyRule(head_dim=8, d_model_multiple=8, min_d_model=16, max_d_model=64, aspect_ratio=16),
                     hyper=HyperRule(base_batch=8, min_batch=4, max_batch=8, min_steps=20))
    return plan_sweep(spec, ModelConfig(vocab_size=33, seq_len=16))


def test_swept_user_keys_multiply_runs_and_show_in_names():
    plan = small_plan()
    jobs = expand_jobs(plan, "s", [["train.seed=0", "logging.log_every=5"], ["train.seed=1", "logging.log_every=5"]])
    assert len(jobs) == 2 * len(plan.runs)
    assert {j.name for j in jobs} == {f"{r.name}-seed{s}" for r in plan.runs for s in (0, 1)}
    assert all("logging.log_every=5" in j.overrides and f"name={j.name}" in j.overrides for j in jobs)


def test_run_overrides_win_over_the_plan():
    plan = small_plan()
    target = plan.runs[0].name
    jobs = expand_jobs(plan, "s", [["logging.log_every=5"]], {target: ["optim.lr=0.5"]})
    lrs = {j.name: [o for o in j.overrides if o.startswith("optim.lr=")] for j in jobs}
    assert lrs[target] == ["optim.lr=0.5"]
    assert all(lrs[r.name] == [f"optim.lr={r.lr:.6g}"] for r in plan.runs[1:])
    assert merge_overrides(["a=1", "+b=2"], ["b=3"]) == ["a=1", "b=3"]


def test_a_run_overrides_glob_that_matches_no_run_is_refused():
    with pytest.raises(ValueError, match=re.escape("hydra.sweeper.run_overrides: 'isoflop-C1e12-*' matches no run of "
                                                   "sweep 's' (its runs: isoflop-C2e9-d16-L1-B8,")):
        expand_jobs(small_plan(), "s", [], {"isoflop-C2e9-d16-*": ["optim.lr=0.5"], "isoflop-C1e12-*": ["optim.lr=1"]})


@pytest.mark.parametrize("combo, message", [
    (["optim.lr=1.0"], "optim.lr=1.0 (run isoflop-C2e9-d16-L1-B8 gets 0.024; set hydra.sweeper.plan.hyper.base_lr"),
    (["model.d_model=32", "logging.log_every=5"], "model.d_model=32 (run isoflop-C2e9-d16-L1-B8 gets 16; set "
                                                  "hydra.sweeper.plan.family"),
    (["optim.warmup_fraction=0.1"], "set hydra.sweeper.plan.hyper.warmup_fraction instead"),
    (["train.tokens=1e6"], "set hydra.sweeper.plan.budgets, plan.tokens or plan.grid_tokens_per_param instead"),
    (["name=mine"], "name=mine (run isoflop-C2e9-d16-L1-B8 gets isoflop-C2e9-d16-L1-B8; the sweep names each run"),
])
def test_a_user_key_the_plan_would_replace_is_refused(combo, message):
    # Before: the plan's value silently won, so the run was not the one asked for.
    with pytest.raises(ValueError, match=re.escape(message)):
        expand_jobs(small_plan(), "s", [combo])


def test_user_keys_equal_to_the_plans_or_outside_it_pass():
    plan = small_plan()
    run = plan.runs[0]
    # the same value written another way, a key the plan leaves alone, and the plan's own null
    same = [f"optim.lr={run.lr:.3e}", "train.steps=None", "train.tokens=null", "optim.decay_shape=1-sqrt"]
    jobs = expand_jobs(dataclasses.replace(plan, runs=[run]), "s", [same])
    assert "optim.decay_shape=1-sqrt" in jobs[0].overrides


# ---------------------------------------------------------------------------------------------------------------
# SLURM for real: scripts/slurm_local.sh installs (apt-get) and starts slurmctld/slurmd/slurmdbd/munge on this machine
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM needs root (it installs and starts daemons)")
    out = subprocess.run([str(REPO / "scripts" / "slurm_local.sh"), "start"], capture_output=True, text=True, timeout=600)
    if out.returncode == 3:
        pytest.skip(f"apt-get could not install slurm-wlm/munge: {out.stderr[-500:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_submitit_slurm_sweep_of_three_runs(slurm, tmp_path):
    sweep_dir = tmp_path / "sweep"
    launch(sweep_dir, "hydra/launcher=slurm_local", "hydra.sweeper.plan.budgets=[2e9]", "hydra.sweeper.plan.n_sizes=3")
    recs = records(sweep_dir)
    assert len(recs) == 3 and all(r["status"] == "completed" for r in recs.values())
    job_ids = submitit_jobs(sweep_dir)
    assert len(job_ids) == 1  # one array job for the sweep
    sacct = sacct_completed(job_ids)
    assert len(sacct) == 3 and all(row["State"] == "COMPLETED" for row in sacct), sacct
    # None of the sweep's tasks still holds the node. (Not "the node is idle": the ladder test's jobs may run beside
    # these on another pytest worker, and the node is then "mixed".)
    queued = subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True, text=True, check=True).stdout.split()
    assert not set(queued) & set(job_ids), queued


@pytest.mark.slow
def test_submitit_slurm_ladder_sweep_launches_the_branches_as_a_second_array_job(slurm, tmp_path):
    from test_ladder import check_ladder_sweep, launch_ladder

    sweep_dir = tmp_path / "sweep"
    check_ladder_sweep(sweep_dir, launch_ladder(sweep_dir, "hydra/launcher=slurm_local"))
    job_ids = submitit_jobs(sweep_dir)
    assert len(job_ids) == 2, job_ids  # the parents' array job, then the branches'
    sacct = sacct_completed(job_ids, "JobID,State,Submit,Start,End")
    assert all(row["State"] == "COMPLETED" for row in sacct), sacct
    parents, branches = ([r for r in sacct if r["JobID"].startswith(f"{j}_")] for j in job_ids)
    assert (len(parents), len(branches)) == (2, 4), sacct
    # The launcher submits the branches once every parent task has written its result. Slurm stamps a task's End only
    # after its process exits, a moment after submitit has read the result (CI saw a branch start 1 s before the last
    # parent's End), so the ordering to check is: result files written, then the branches' array job submitted.
    results = list((sweep_dir / ".submitit").glob(f"{job_ids[0]}_*/*_result.pkl"))
    assert len(results) == 2, results
    written = max(datetime.fromtimestamp(int(p.stat().st_mtime)).isoformat() for p in results)  # sacct's local time
    assert written <= min(r["Submit"] for r in branches), (written, sacct)  # ISO times sort as strings
    assert max(r["Start"] for r in parents) < min(r["Start"] for r in branches), sacct


def submitit_jobs(sweep_dir: Path) -> list[str]:
    """The Slurm job ids of a sweep's array jobs, in submission order (submitit's folders are <job>_<task>)."""
    return sorted({p.name.split("_")[0] for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()}, key=int)


def sacct_completed(job_ids: list[str], fields: str = "JobID,State,Start,End") -> list[dict]:
    """sacct's rows (one per array task) of these jobs, once all are COMPLETED or after 60 s.

    submitit returns once a task has written its result, a moment before Slurm marks the task COMPLETED (seen under
    load: the last task still RUNNING): poll the accounting for a while instead of reading it once.
    """
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", fields, "-j", ",".join(job_ids)],
                             capture_output=True, text=True, check=True).stdout.split()
        rows = [dict(zip(fields.split(","), line.split("|"))) for line in out]
        if all(r["State"] == "COMPLETED" for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------------------------------
# schedule: the pure function behind the Hydra plugin (plan + run-dir statuses -> jobs to launch, groups)
# --------------------------------------------------------------------------------------------------------------------
def _lr_jobs():
    spec = SweepSpec(kind="lr", budgets=[2e9], sizes=[16, 24], lrs=[1e-3, 3e-3, 1e-2])
    plan = plan_sweep(spec, ModelConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=33, seq_len=16))
    return expand_jobs(plan, "s", [])


def test_schedule_without_grouping_launches_every_unfinished_run_as_its_own_job():
    jobs = _lr_jobs()
    statuses = {jobs[0].name: "completed", jobs[1].name: "diverged", jobs[2].name: "failed", jobs[3].name: "corrupt"}
    s = schedule(jobs, statuses)
    assert [j.name for j in s.singles] == [j.name for j in jobs[2:]]  # failed, corrupt and missing runs are retried
    assert s.grouped == [] and s.finished == [jobs[0].name, jobs[1].name]
    assert (s.n_runs, s.n_jobs) == (len(jobs) - 2, len(jobs) - 2)
    assert s.job_group == {j.name: j.name for j in jobs}
    # skip_finished=False relaunches everything (a finished run is still skipped inside train, by its record)
    assert len(schedule(jobs, statuses, skip_finished=False).singles) == len(jobs)


def test_schedule_groups_runs_with_equal_keys_and_launches_only_unfinished_members():
    jobs = _lr_jobs()  # 2 sizes x 3 lrs: two groups of three by shape
    keys = {j.name: j.run.group for j in jobs}  # the planner's own same-shape groups
    s = schedule(jobs, {}, keys)
    assert [[j.name for j in g] for g in s.grouped] == [[j.name for j in jobs[:3]], [j.name for j in jobs[3:]]]
    assert s.singles == [] and (s.n_runs, s.n_jobs) == (6, 2)
    assert {s.job_group[j.name] for j in jobs[:3]} == {jobs[0].name}
    # the lead finished: the group launches its two unfinished members, led by the first of them
    s = schedule(jobs, {jobs[0].name: "completed", jobs[4].name: "diverged"}, keys)
    assert [[j.name for j in g] for g in s.grouped] == [[jobs[1].name, jobs[2].name], [jobs[3].name, jobs[5].name]]
    assert s.job_group[jobs[1].name] == jobs[0].name  # the manifest keeps the planned grouping
    # max_k splits a group; a group of one planned run is an ordinary job
    s = schedule(jobs, {}, keys, max_k=2)
    assert [len(g) for g in s.groups] == [2, 1, 2, 1] and [j.name for j in s.singles] == [jobs[2].name, jobs[5].name]
    # everything finished: nothing to launch
    s = schedule(jobs, {j.name: "completed" for j in jobs}, keys)
    assert (s.n_runs, s.n_jobs, len(s.finished)) == (0, 0, 6)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_schedule_rejects_bad_max_k(bad):
    with pytest.raises(ValueError, match=r"hydra.sweeper.max_k=.* is invalid: use a positive integer"):
        schedule(_lr_jobs(), {}, None, max_k=bad)


def test_parse_vmap():
    assert [parse_vmap(v) for v in ("auto", "TRUE", False, True)] == ["auto", "true", "false", "true"]
    with pytest.raises(ValueError, match=r"vmap='sometimes' is invalid: use auto .*, true or false"):
        parse_vmap("sometimes")

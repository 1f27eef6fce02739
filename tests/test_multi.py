import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling.model.decoder import ModelConfig, init_params
from scaling.train.stack import (check_group, group_by_shape, init_many, make_multi_step, unit_lr_input,
                                 unit_lr_optimizer, use_vmap)
from scaling.train.optim import OptimConfig
from scaling.train.tracking import read_metrics
from scaling.record import read_record, write_record
from scaling.train.loop import make_train_step, train, train_group
from scaling.train.loop import train_runs as train_many  # K runs of one shape: the one loop with K > 1
from test_tracking import inspect_summary, run_files, wandb_env  # noqa: F401 - a fixture
from test_train import tiny_config

MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=64, seq_len=16)


@pytest.mark.parametrize("shared_batch", [True, False])
def test_vmapped_step_equals_separate_steps(shared_batch):
    lrs, seeds, steps = [1e-3, 3e-3, 1e-2], [0, 1, 2], 4
    base = OptimConfig(lr=3e-3, warmup_steps=2)
    opt = unit_lr_optimizer(base, 10)
    state = init_many(MODEL, opt, seeds, lrs)
    batches = jax.random.randint(jax.random.key(7), (3, 1, 8, 17), 0, 64)
    step = make_multi_step(MODEL, opt, 1, 0, shared_batch)
    losses_SxK = []
    for s in range(steps):
        state, m = step(state, batches[0] if shared_batch else batches, jnp.asarray(s))
        losses_SxK.append(np.asarray(m["train_loss"]))
    for k in range(3):
        single_opt = dataclasses.replace(base, lr=lrs[k]).build(10)
        params = init_params(MODEL, jax.random.key(seeds[k]))
        single = {"params": params, "opt_state": single_opt.init(params)}
        one_step = make_train_step(MODEL, single_opt, 1, 0)
        for s in range(steps):
            single, m = one_step(single, batches[0] if shared_batch else batches[k], jnp.asarray(s))
            assert float(m["train_loss"]) == pytest.approx(float(losses_SxK[s][k]), rel=1e-5), (k, s)
        # Adam's first steps turn float noise in near-zero gradient entries into up to ~lr-sized moves, so params
        # agree to a small fraction of the total movement (steps * lr), not bitwise.
        for a, b in zip(jax.tree_util.tree_leaves(state["params"]), jax.tree_util.tree_leaves(single["params"])):
            np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b), atol=0.05 * lrs[k] * steps)
    # Different learning rates really act: the models end in different places.
    assert len({round(float(x), 4) for x in losses_SxK[-1]}) == 3


def test_vmapped_step_with_the_lr_as_input_equals_its_schedule_compiled_in_bit_for_bit():
    # The trainer gives the K > 1 step its lr = 1 schedule's value as an input (scaling.train.loop._build_stack);
    # against the schedule inside the vmapped step, nothing may change.
    lrs, seeds, steps = [1e-3, 3e-3, 1e-2], [0, 1, 2], 6
    base = OptimConfig(lr=3e-3, warmup_steps=2, schedule="wsd", decay_fraction=0.5)
    inside = unit_lr_optimizer(base, steps)
    unit_lr, with_lr = unit_lr_input(base, steps)  # what the trainer builds
    batch = jax.random.randint(jax.random.key(7), (1, 8, 17), 0, 64)
    a, b = init_many(MODEL, inside, seeds, lrs), init_many(MODEL, inside, seeds, lrs)
    step_a, step_b = make_multi_step(MODEL, inside, 1, 0, True), make_multi_step(MODEL, with_lr, 1, 0, True)
    for s in range(steps):
        a, _ = step_a(a, batch, jnp.asarray(s))
        b, _ = step_b(b, batch, jnp.asarray(s), unit_lr(jnp.asarray(s)))
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_train_many_writes_one_record_per_model_equal_to_separate_runs(tmp_path):
    lrs = [3e-3, 1e-2, 3e-2]
    cfgs = []
    for i, lr in enumerate(lrs):
        cfg = tiny_config(tmp_path, steps=8)
        cfg.name = f"lr{i}"
        cfg.optim = dataclasses.replace(cfg.optim, lr=lr)
        cfgs.append(cfg)
    dirs = [tmp_path / "group" / c.name for c in cfgs]
    records = train_many(cfgs, dirs)
    reference = train(cfgs[1], tmp_path / "single")
    assert [r["status"] for r in records] == ["completed"] * 3
    assert records[1]["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert records[1]["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-4)
    for key in ("N", "N_total", "D", "C", "C_chinchilla", "steps", "tokens_per_step"):
        assert records[0][key] == reference[key], key
    for r, d, lr in zip(records, dirs, lrs):
        on_disk = json.loads((d / "record.json").read_text())
        assert on_disk["name"] == r["name"] and on_disk["optim"]["lr"] == lr
        assert on_disk["vmap_group"]["K"] == 3 and on_disk["group_tokens_per_s"] > 0
        metrics = read_metrics(d / "metrics.jsonl")
        assert [m["step"] for m in metrics if "eval_loss" in m] == [6, 8]
        ref_lrs = [m["lr"] * lr / lrs[1] for m in read_metrics(tmp_path / "single" / "metrics.jsonl")]
        assert [m["lr"] for m in metrics] == pytest.approx(ref_lrs)
    assert len({r["loss"] for r in records}) == 3
    # A completed group is not retrained.
    mtime = (dirs[0] / "record.json").stat().st_mtime_ns
    assert train_many(cfgs, dirs)[0]["loss"] == records[0]["loss"]
    assert (dirs[0] / "record.json").stat().st_mtime_ns == mtime


def test_diverging_model_does_not_disturb_the_others(tmp_path):
    cfgs = []
    for i, lr in enumerate([1e-2, 1e4]):
        cfg = tiny_config(tmp_path, steps=10)
        cfg.name = f"m{i}"
        cfg.optim = OptimConfig(lr=lr, warmup_steps=0, grad_clip=None, schedule="constant")
        cfgs.append(cfg)
    records = train_many(cfgs, [tmp_path / c.name for c in cfgs])
    assert records[0]["status"] == "completed" and np.isfinite(records[0]["loss"])
    assert records[1]["status"] == "diverged" and records[1]["diverged_step"] is not None
    alone = train(cfgs[0], tmp_path / "alone")
    assert records[0]["loss"] == pytest.approx(alone["loss"], rel=1e-4)


def test_group_rules(tmp_path):
    a, b, c = tiny_config(tmp_path), tiny_config(tmp_path), tiny_config(tmp_path)
    b.optim = dataclasses.replace(b.optim, lr=0.5)
    b.train = dataclasses.replace(b.train, seed=3)
    c.model = c.model.replace(d_model=64)
    check_group([a, b])
    with pytest.raises(ValueError, match=r"configs\[1\] \(tiny\) differs from configs\[0\] in \['model.d_model'\]"):
        check_group([a, c])
    assert group_by_shape([a, c, b, a], max_k=2) == [[0, 2], [3], [1]]
    with pytest.raises(ValueError, match="one distinct run directory per config"):
        train_many([a, b], [tmp_path / "x", tmp_path / "x"])


def test_train_group_trains_only_unfinished_members_with_or_without_vmap(tmp_path):
    cfgs = []
    for i, lr in enumerate([3e-3, 1e-2, 3e-2]):
        cfg = tiny_config(tmp_path, steps=6)
        cfg.name = f"g{i}"
        cfg.optim = dataclasses.replace(cfg.optim, lr=lr)
        cfgs.append(cfg)
    dirs = [tmp_path / "sweep" / c.name for c in cfgs]
    # g1 already diverged in an earlier attempt: a relaunch leaves it alone (as the sweeper does); g0, g2 train.
    diverging = dataclasses.replace(cfgs[1], optim=OptimConfig(lr=1e4, warmup_steps=0, grad_clip=None, schedule="constant"))
    diverged = train(diverging, tmp_path / "diverged")
    assert diverged["status"] == "diverged"
    dirs[1].mkdir(parents=True)
    write_record(dirs[1], read_record(tmp_path / "diverged"))
    records = train_group(cfgs, dirs, vmap=True)
    assert [r["status"] for r in records] == ["completed", "diverged", "completed"]
    assert records[0]["vmap_group"] == {"K": 2, "index": 0} and records[2]["vmap_group"] == {"K": 2, "index": 1}
    # Without vmap (the CPU default under auto) the unfinished members train one by one with scaling.train.loop.train.
    (dirs[2] / "record.json").unlink()
    stamp = (dirs[0] / "record.json").stat().st_mtime_ns
    again = train_group(cfgs, dirs, vmap=False)
    assert again[2]["status"] == "completed" and "vmap_group" not in again[2]
    assert again[2]["loss"] == pytest.approx(records[2]["loss"], rel=1e-4)  # vmapped = separate, 6 steps
    assert (dirs[0] / "record.json").stat().st_mtime_ns == stamp
    assert train_group(cfgs, dirs, vmap="auto") == again  # everything finished: nothing trains
    assert use_vmap("auto") is (jax.default_backend() != "cpu")
    with pytest.raises(ValueError, match="vmap='sometimes' is invalid"):
        use_vmap("sometimes")


_KILLED_GROUP = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import scaling.train.loop as T
from test_multi import _kill_group

class KillAfter(T.Checkpointer):
    def save(self, step, state, meta, force=False):
        saved = super().save(step, state, meta, force)
        if step == 6:  # after step 6 is logged; the newest checkpoint is step 4
            self.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

T.Checkpointer = KillAfter
cfgs, dirs = _kill_group(Path({root!r}))
T.train_runs(cfgs, dirs)
"""


def _kill_group(root):
    cfgs = []
    for i, lr in enumerate([3e-3, 1e-2, 1e4]):  # the last one diverges
        cfg = tiny_config(root, steps=12)  # checkpoint every 4, log every 2, eval every 6
        cfg.name = f"k{i}"
        cfg.optim = dataclasses.replace(cfg.optim, lr=lr)
        cfgs.append(cfg)
    return cfgs, [root / "group" / c.name for c in cfgs]


def test_group_resumes_after_kill_9_bit_identical(tmp_path, caplog):
    import subprocess
    import sys
    from pathlib import Path

    from scaling.train.checkpoint import Checkpointer
    from scaling.train.stack import group_checkpoint_dir

    ref_cfgs, ref_dirs = _kill_group(tmp_path / "ref")
    ref = train_many(ref_cfgs, ref_dirs)

    root = tmp_path / "run"
    script = _KILLED_GROUP.format(tests=str(Path(__file__).parent), root=str(root))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == -9, proc.stderr[-3000:]
    cfgs, dirs = _kill_group(root)
    ckpts = group_checkpoint_dir(dirs) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["4"]
    assert not any((d / "record.json").exists() for d in dirs)
    before = [read_metrics(d / "metrics.jsonl") for d in dirs]
    assert [m["step"] for m in before[0]] == [2, 4, 6]  # step 6 is redone

    # Another member set never sees this group's checkpoint.
    assert group_checkpoint_dir(dirs[:2]) != group_checkpoint_dir(dirs)
    assert group_checkpoint_dir(dirs[::-1]) != group_checkpoint_dir(dirs)

    with caplog.at_level("INFO", logger="scaling.train.loop"):
        resumed = train_many(cfgs, dirs)
    assert "from step 4" in caplog.text  # resumed, not retrained from step 0 (which would also match the reference)
    for b, d in zip(before, dirs):
        assert read_metrics(d / "metrics.jsonl")[:2] == b[:2]  # rows up to the checkpoint kept, timings included
    assert [r["status"] for r in resumed] == [r["status"] for r in ref]
    # k2 diverged at step 4, before the kill: the resumed group learns it from the checkpoint's meta.
    assert ref[2]["status"] == "diverged" and ref[2]["diverged_step"] == 4 and resumed[2]["diverged_step"] == 4
    timing = ("tokens_per_s", "mfu")
    for r, q, d, e in zip(ref, resumed, ref_dirs, dirs):
        for key in ("loss", "train_loss"):
            assert np.asarray(r[key]).tobytes() == np.asarray(q[key]).tobytes(), (r["name"], key)  # to the last bit
        rows = lambda p: [{k: v for k, v in m.items() if k not in timing} for m in read_metrics(p / "metrics.jsonl")]  # noqa: E731
        assert rows(e) == rows(d), r["name"]

    def final(dirs_):
        state = init_many(MODEL.replace(vocab_size=ref_cfgs[0].model.vocab_size),
                          unit_lr_optimizer(ref_cfgs[0].optim, 12), [0, 0, 0], [1.0] * 3)
        with Checkpointer(group_checkpoint_dir(dirs_) / "checkpoints", ref_cfgs[0].train.checkpoint) as c:
            step, params, _ = c.restore_latest(state)
        assert step == 12
        return params

    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           final(ref_dirs), final(dirs))

    # Killed after the final checkpoint, before the records: the relaunch writes them without training.
    for d in dirs:
        (d / "record.json").unlink()
    again = train_many(cfgs, dirs)
    assert [(r["status"], r["diverged_step"]) for r in again] == [(r["status"], r["diverged_step"]) for r in ref]
    for r, q in zip(ref, again):
        for key in ("loss", "train_loss"):
            assert np.asarray(r[key]).tobytes() == np.asarray(q[key]).tobytes(), (r["name"], key)


def test_group_logs_one_wandb_run_per_member_in_the_sweep_group(wandb_env):
    tmp_path = wandb_env
    cfgs = []
    for i, lr in enumerate([3e-3, 1e-2]):
        cfg = tiny_config(tmp_path, steps=4)
        cfg.name, cfg.sweep = f"w{i}", "sweepW"
        cfg.optim = dataclasses.replace(cfg.optim, lr=lr)
        cfg.logging = dataclasses.replace(cfg.logging, backend="wandb", wandb_mode="offline", group="sweepW")
        cfgs.append(cfg)
    dirs = [tmp_path / "sweepW" / c.name for c in cfgs]
    records = train_many(cfgs, dirs)
    ids = [(d / "wandb_id").read_text().strip() for d in dirs]
    assert len(set(ids)) == 2  # one wandb run per member, all open in one process
    for d, rec, run_id in zip(dirs, records, ids):
        files = run_files(d)
        assert [f.name for f in files] == [f"run-{run_id}.wandb"]
        summary, _ = inspect_summary(files[0])
        assert summary["summary"]["loss"] == pytest.approx(rec["loss"]) and summary["summary"]["status"] == "completed"
        assert summary["summary"]["N"] == rec["N"]
    from analysis.load import read_wandb_file

    assert read_wandb_file(run_files(dirs[1])[0])["group"] == "sweepW"  # grouped by sweep on the dashboard


_GROUP_ON_FOUR_DEVICES = """
import dataclasses, json, sys
from pathlib import Path
import jax
sys.path.insert(0, "tests")
from test_train import tiny_config
from scaling.train.sharding import ShardingConfig
from scaling.train.loop import train_runs

assert jax.device_count() == 4
tmp, out = Path(sys.argv[1]), {}
for label, sh in [("one", ShardingConfig(n_devices=1)), ("dp", ShardingConfig(mode="dp")),
                  ("fsdp", ShardingConfig(mode="fsdp", fsdp_min_params=64))]:
    cfgs = []
    for i, lr in enumerate([3e-3, 1e-2]):
        cfg = tiny_config(tmp, steps=6)
        cfg.name, cfg.sharding = f"{label}{i}", sh
        cfg.optim = dataclasses.replace(cfg.optim, lr=lr)
        cfgs.append(cfg)
    records = train_runs(cfgs, [tmp / label / c.name for c in cfgs])
    out[label] = [[r["loss"], r["n_devices"], r["vmap_group"]["K"]] for r in records]
print(json.dumps(out))
"""


def test_vmapped_group_trains_on_a_data_parallel_and_fsdp_mesh(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _GROUP_ON_FOUR_DEVICES, str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parent.parent, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for label in ("dp", "fsdp"):
        for (loss, n_devices, K), (ref, _, _) in zip(out[label], out["one"]):
            assert (n_devices, K) == (4, 2)
            assert loss == pytest.approx(ref, rel=1e-4)  # the same maths, summed across devices in another order

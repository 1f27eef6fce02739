"""Data parallel / FSDP on 4 forced host devices, and a 2-process multi-host run on localhost.

Several devices need XLA_FLAGS before JAX starts, so those checks run in subprocesses; the main pytest process has one.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from scaling.train.sharding import ShardingConfig, check_batch, leaf_spec, make_mesh

REPO = Path(__file__).resolve().parent.parent

# Tolerance: the same maths summed in another order (per-device partial sums, then an all-reduce), through 8 Adam
# steps on a tiny model: float32 differences stay below 1e-5 relative; we allow 1e-4.
LOSS_RTOL = 1e-4

FOUR_DEVICES = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import jax, numpy as np
    sys.path.insert(0, "tests")
    from test_train import tiny_config
    from scaling.train.sharding import ShardingConfig, describe, init_sharded, make_mesh, state_shardings
    from scaling.model.decoder import init_params
    from scaling.train.loop import train

    assert jax.device_count() == 4, jax.devices()
    tmp = Path(sys.argv[1])
    out = {}
    for label, sh in [("one", ShardingConfig(n_devices=1)), ("dp", ShardingConfig(mode="dp")),
                      ("fsdp", ShardingConfig(mode="fsdp", fsdp_min_params=64))]:
        cfg = tiny_config(tmp, steps=8)
        cfg.sharding = sh
        record = train(cfg, tmp / label)
        out[label] = {"loss": record["loss"], "train_loss": record["train_loss"], "n_devices": record["n_devices"]}

    # FSDP really shards: the state after init and after a step lives in pieces.
    cfg = tiny_config(tmp)
    mesh = make_mesh(ShardingConfig(mode="fsdp"))
    optimizer = cfg.optim.build(10)
    def init():
        p = init_params(cfg.model, jax.random.key(0))
        return {"params": p, "opt_state": optimizer.init(p)}
    fsdp_cfg = ShardingConfig(mode="fsdp", fsdp_min_params=64)
    state, shardings = init_sharded(init, lambda s: state_shardings(s, mesh, fsdp_cfg))
    from scaling.train.loop import make_train_step
    from scaling.train.sharding import put_batch
    step = make_train_step(cfg.model, optimizer, 1, 0, shardings)
    batch = np.random.default_rng(0).integers(0, 33, (1, 8, 17)).astype(np.int32)
    new_state, _ = step(state, put_batch(batch, mesh, 1), jax.numpy.asarray(0))
    qkv = new_state["params"]["block_0"]["attn"]["qkv"]["kernel"]
    out["fsdp_state"] = describe(new_state)
    out["qkv_shard_shape"] = list(qkv.addressable_shards[0].data.shape)
    out["qkv_shape"] = list(qkv.shape)
    out["mu_spec"] = str(new_state["opt_state"][1][0].mu["block_0"]["attn"]["qkv"]["kernel"].sharding.spec)
    print("RESULT" + json.dumps(out))
    """
)


def _run(script: str, *args, env_extra=None, timeout=600) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow
def test_four_device_data_parallel_and_fsdp_match_one_device(tmp_path):
    out = _run(FOUR_DEVICES, tmp_path, env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert [out[k]["n_devices"] for k in ("one", "dp", "fsdp")] == [1, 4, 4]
    for mode in ("dp", "fsdp"):
        for key in ("loss", "train_loss"):
            assert out[mode][key] == pytest.approx(out["one"][key], rel=LOSS_RTOL), (mode, key)
    # FSDP: the qkv kernel [32, 96] is split 4 ways along its largest dim, and so is its Adam moment.
    assert out["qkv_shape"] == [32, 96] and out["qkv_shard_shape"] == [32, 24]
    assert "data" in out["mu_spec"]
    state = out["fsdp_state"]
    assert state["sharded_leaves"] > 0
    # Only the embedding-free small leaves (norms, biases < 64 values) are replicated: each device holds far less
    # than the whole state.
    assert state["bytes_per_device_max"] < 0.5 * state["bytes_total"]


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import jax, numpy as np
    from scaling.train.sharding import ShardingConfig, initialize_distributed, make_mesh, put_batch, state_shardings, init_sharded
    from scaling.model.decoder import ModelConfig, init_params
    from scaling.train.optim import OptimConfig
    from scaling.train.loop import make_train_step

    mode, coordinator, pid = sys.argv[1], sys.argv[2], sys.argv[3]
    if coordinator == "slurm":
        cfg = ShardingConfig(mode=mode, fsdp_min_params=64)
    else:
        cfg = ShardingConfig(mode=mode, fsdp_min_params=64, coordinator=coordinator, num_processes=2, process_id=int(pid))
    assert initialize_distributed(cfg)
    assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
    model = ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=64, seq_len=16)
    optimizer = OptimConfig(lr=1e-2, warmup_steps=0).build(10)
    mesh = make_mesh(cfg)
    def init():
        p = init_params(model, jax.random.key(0))
        return {"params": p, "opt_state": optimizer.init(p)}
    state, shardings = init_sharded(init, lambda s: state_shardings(s, mesh, cfg))
    step = make_train_step(model, optimizer, 1, 0, shardings)
    losses = []
    for s in range(3):
        batch = np.random.default_rng(0).integers(0, 64, (1, 8, 17)).astype(np.int32)
        state, m = step(state, put_batch(batch, mesh, 1), jax.numpy.asarray(s))
        losses.append(float(m["train_loss"]))
    print("RESULT" + json.dumps({"losses": losses, "process": jax.process_index()}))
    jax.distributed.shutdown()
    """
)


SLURM_PORT_BASE = 65535 - 2**12 + 1  # JAX's SlurmCluster: port = SLURM_JOB_ID % 4096 + this


def _free_port(candidates=(0,)) -> int:
    for candidate in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", int(candidate)))
            except OSError:
                continue
            return s.getsockname()[1]
    pytest.skip("no free port")


def _single_process_losses() -> list[float]:
    import jax

    from scaling.model.decoder import ModelConfig, init_params
    from scaling.train.optim import OptimConfig
    from scaling.train.loop import make_train_step

    model = ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=64, seq_len=16)
    optimizer = OptimConfig(lr=1e-2, warmup_steps=0).build(10)
    params = init_params(model, jax.random.key(0))
    state = {"params": params, "opt_state": optimizer.init(params)}
    step = make_train_step(model, optimizer, 1, 0)
    losses = []
    for s in range(3):
        batch = np.random.default_rng(0).integers(0, 64, (1, 8, 17)).astype(np.int32)
        state, m = step(state, jax.numpy.asarray(batch), jax.numpy.asarray(s))
        losses.append(float(m["train_loss"]))
    return losses


def _two_processes(mode: str, how: str) -> list[dict]:
    rng = np.random.default_rng(os.getpid())
    port = _free_port(SLURM_PORT_BASE + rng.permutation(2**12)[:50]) if how == "slurm" else _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
        if how == "slurm":
            # What srun (and so submitit) sets; JAX's SlurmCluster derives the port from the job id.
            env.update(SLURM_JOB_ID=str(4096 * 7 + port - SLURM_PORT_BASE), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                       SLURM_PROCID=str(pid), SLURM_LOCALID="0", SLURM_STEP_NUM_NODES="1")
            coordinator = "slurm"
        else:
            coordinator = f"127.0.0.1:{port}"
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, mode, coordinator, str(pid)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
        results.append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT"))[len("RESULT"):]))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("mode, how", [("dp", "flags"), ("fsdp", "slurm")])
def test_two_process_multi_host_matches_single_process(mode, how):
    results = _two_processes(mode, how)
    assert sorted(r["process"] for r in results) == [0, 1]
    reference = _single_process_losses()
    for r in results:
        np.testing.assert_allclose(r["losses"], reference, rtol=LOSS_RTOL)
    assert reference[-1] < reference[0]


def test_leaf_spec_rules():
    from jax.sharding import PartitionSpec as P

    assert leaf_spec((32, 96), "fsdp", 4, 64) == P(None, "data")  # the largest divisible dim
    assert leaf_spec((96, 32), "fsdp", 4, 64) == P("data", None)
    assert leaf_spec((30, 6), "fsdp", 4, 64) == P()  # nothing divisible by 4: replicated
    assert leaf_spec((32,), "fsdp", 4, 64) == P()  # small: replicated
    assert leaf_spec((32, 96), "dp", 4, 64) == P()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(mode="zero"), "sharding.mode='zero' is unknown"),
        (dict(n_devices=0), "sharding.n_devices=0 is invalid"),
        (dict(coordinator="h:1", num_processes=2), "give all three"),
        (dict(coordinator="host", num_processes=2, process_id=0), "give host:port"),
        (dict(coordinator="h:1", num_processes=2, process_id=2), "sharding.process_id=2 is invalid"),
    ],
)
def test_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        ShardingConfig(**kw)


def test_mesh_and_batch_errors():
    import jax

    with pytest.raises(ValueError, match=f"sharding.n_devices={jax.device_count() + 1} exceeds"):
        make_mesh(ShardingConfig(n_devices=jax.device_count() + 1))
    mesh = make_mesh(ShardingConfig())
    check_batch(mesh, 8, 2)  # one device: anything splits

    class FakeMesh:
        size = 4

    with pytest.raises(ValueError, match="train.batch_size=12 \\(microbatch 6 with grad_accum=2\\) does not split over 4"):
        check_batch(FakeMesh(), 12, 2)


def test_two_process_training_run_writes_one_record_equal_to_one_process(tmp_path):
    """The whole `python -m scaling.train` on 2 localhost processes (jax.distributed, explicit coordinator)."""
    common = [
        sys.executable, "-m", "scaling.train", "model=tiny", "data=synthetic", "logging=none", "train=steps",
        "train.steps=12", "train.batch_size=8", "train.eval_every=6", "train.eval_tokens=2048",
        "train.checkpoint.every=6", "logging.log_every=2", "data.synthetic.vocab_size=32",
        "data.synthetic.n_tokens=50000", "model.vocab_size=33", f"data.cache_dir={tmp_path / 'cache'}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    single = subprocess.run([*common, f"hydra.run.dir={tmp_path / 'single'}"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    port = _free_port()
    procs = [
        subprocess.Popen(
            [*common, f"hydra.run.dir={tmp_path / 'multi'}", f"sharding.coordinator=127.0.0.1:{port}",
             "sharding.num_processes=2", f"sharding.process_id={pid}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for pid in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    one = json.loads((tmp_path / "single" / "record.json").read_text())
    two = json.loads((tmp_path / "multi" / "record.json").read_text())
    assert (one["n_devices"], two["n_devices"], two["status"]) == (1, 2, "completed")
    # Same global batch split over 2 processes: only the reduction order differs (float32, ~1e-7 relative).
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    lines = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4, 6, 8, 10, 12]  # written once, by process 0
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir()) == ["12", "6"]


# --------------------------------------------------------------------------------------------------------------------
# sharding.cpu_devices: one CPU host as N XLA devices (jax_num_cpu_devices), the step data parallel over them
# --------------------------------------------------------------------------------------------------------------------
def test_cpu_devices_run_trains_on_that_many_devices_with_the_one_device_losses(tmp_path):
    def run(name, *extra):
        cmd = [sys.executable, "-m", "scaling.train", "model=tiny", "train=steps", "logging=none", f"name={name}",
               f"hydra.run.dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}", *extra]
        proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / name / "record.json").read_text())

    one, two = run("one"), run("two", "sharding.cpu_devices=2", "sharding.mode=fsdp")
    assert (one["n_devices"], two["n_devices"]) == (1, 2)
    assert two["status"] == one["status"] == "completed"
    assert two["loss"] == pytest.approx(one["loss"], rel=LOSS_RTOL)


def test_cpu_devices_refused_once_the_backend_runs_with_another_count():
    import jax

    from scaling.train.sharding import configure_cpu_devices

    have = len(jax.devices("cpu"))  # this pytest process started its backend long ago
    configure_cpu_devices(ShardingConfig(cpu_devices=have))  # the count it has: nothing to do
    with pytest.raises(ValueError, match=f"sharding.cpu_devices={have + 1}, but JAX's CPU backend has already started "
                                         f"in this process with {have} device"):
        configure_cpu_devices(ShardingConfig(cpu_devices=have + 1))
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match=f"sharding.cpu_devices={bad!r} is invalid"):
            ShardingConfig(cpu_devices=bad)


# --- pin_cores: one core per joblib job (configs/hydra/launcher/joblib_cpu.yaml) --------------------------------------

PIN = textwrap.dedent(
    """
    import fcntl, json, os, sys, threading
    from pathlib import Path
    os.sched_setaffinity(0, range(os.cpu_count()))  # a fresh job process: every core (pytest's worker may be pinned)
    machine = sorted(os.sched_getaffinity(0))  # (what a cgroup's cpuset leaves of them)
    lock_dir = Path(sys.argv[1])
    for core in {"first": machine[:1], "all": machine}[sys.argv[2]]:  # cores another job holds
        f = open(lock_dir / f"core{core}.lock", "a"); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        globals().setdefault("held", []).append(f)
    import jax, jax.numpy as jnp
    from scaling.train.sharding import pin_cores
    cores = pin_cores(lock_dir=lock_dir)
    x = jnp.ones((256, 256))
    jax.jit(lambda a: (a @ a).sum())(x).block_until_ready()  # starts the backend and its intra-op pool
    pool = [t for t in os.listdir("/proc/self/task") if open(f"/proc/self/task/{t}/comm").read().startswith("tf_XLAEigen")]
    print(json.dumps({"machine": machine, "cores": cores, "affinity": sorted(os.sched_getaffinity(0)), "pool": len(pool),
                      "again": pin_cores(lock_dir=lock_dir)}))
    """
)


def _pin(tmp_path, held, value="1"):
    env = {**os.environ, "SCALING_CORES_PER_JOB": value, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", PIN, str(tmp_path), held], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


needs_two_cores = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or (os.cpu_count() or 1) < 2,
                                     reason="needs 2 cores and Linux's affinity API")


@needs_two_cores
def test_pin_cores_gives_a_free_core_and_a_one_thread_pool(tmp_path):
    out, _ = _pin(tmp_path, held="first")  # another job holds the first core: this one takes the next
    if len(out["machine"]) < 2:
        pytest.skip("this process's cpuset leaves one core")
    assert out["cores"] == [out["machine"][1]] and out["affinity"] == [out["machine"][1]]
    # The point of pinning: XLA:CPU sizes its intra-op pool by the cores the process may use (one thread, not one per
    # core), whatever intra_op_parallelism_threads says.
    assert out["pool"] <= 1
    assert out["again"] is None  # a reused worker's next job keeps its core


@needs_two_cores
def test_pin_cores_runs_unpinned_when_no_core_is_free(tmp_path):
    out, err = _pin(tmp_path, held="all")
    if len(out["machine"]) < 2:
        pytest.skip("this process's cpuset leaves one core")
    assert out["cores"] is None and out["affinity"] == out["machine"]
    assert out["pool"] >= 2  # unpinned, the pool has a thread per core: what the pinned test's one thread is against
    assert "cores are free of other jobs" in err and "running unpinned" in err and "hydra.launcher.n_jobs" in err


def test_pin_cores_rejects_a_bad_value_and_is_a_no_op_unset(tmp_path):
    from scaling.train.sharding import pin_cores

    with pytest.raises(ValueError, match=r"SCALING_CORES_PER_JOB='two' is invalid: give a positive number"):
        pin_cores({"SCALING_CORES_PER_JOB": "two"}, lock_dir=tmp_path)
    assert pin_cores({}, lock_dir=tmp_path) is None and not list(tmp_path.iterdir())


@needs_two_cores
def test_pin_cores_is_too_late_once_the_backend_runs(tmp_path, caplog):
    import jax

    from scaling.train.sharding import pin_cores

    jax.devices()  # this pytest process's backend has started
    before = os.sched_getaffinity(0)
    assert pin_cores({"SCALING_CORES_PER_JOB": "1"}, lock_dir=tmp_path) is None
    assert os.sched_getaffinity(0) == before and "JAX's backend already started" in caplog.text

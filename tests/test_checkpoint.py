import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling.train.checkpoint import CheckpointConfig, Checkpointer, CorruptCheckpointError, fingerprint
from scaling.train.optim import OptimConfig


def make_state(seed: int) -> dict:
    """A GPT-shaped params tree (mixed dtypes) + its real AdamW opt_state, filled with random values."""
    k = iter(jax.random.split(jax.random.key(seed), 16))
    D, V = 8, 16
    params = {
        "wte": {"embedding": jax.random.normal(next(k), (V, D))},
        "block_0": {
            "ln_1": {"scale": jnp.ones((D,)), "bias": jax.random.normal(next(k), (D,))},
            "attn": {"qkv": {"kernel": jax.random.normal(next(k), (D, 3 * D), jnp.bfloat16),
                             "bias": jnp.zeros((3 * D,), jnp.bfloat16)}},
        },
        "head": {"kernel": jax.random.normal(next(k), (D, V))},
    }
    tx = OptimConfig(warmup_steps=0).build(10)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jax.random.normal(next(k), p.shape, p.dtype), params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments and count=1
    return {"params": params, "opt_state": opt_state}


def assert_bit_identical(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8))


def data_files(step_dir: Path) -> list[Path]:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array data files under {step_dir}"
    return files


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"


def test_round_trip_bit_identical_with_template_structure(ckdir):
    state = make_state(0)
    meta = {"tokens_seen": 12345, "seed": 7, "wandb_id": "abc123", "best_loss": float("inf")}
    with Checkpointer(ckdir, CheckpointConfig(every=5)) as ck:
        assert ck.save(5, state, meta)
    template = make_state(1)  # different values, same structure
    with Checkpointer(ckdir, CheckpointConfig(every=5)) as ck:
        step, restored, got_meta = ck.restore_latest(template)
    assert step == 5 and got_meta == meta
    assert_bit_identical(restored, state)
    assert type(restored["opt_state"]) is type(state["opt_state"])  # optax namedtuples come back
    for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(template)):
        assert isinstance(x, jax.Array) and x.sharding == t.sharding


def test_restore_from_abstract_template(ckdir):
    state = make_state(0)
    with Checkpointer(ckdir, CheckpointConfig(every=1)) as ck:
        ck.save(3, state, {})
        ck.wait()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        step, restored, _ = ck.restore_latest(abstract)
    assert step == 3
    assert_bit_identical(restored, state)


def test_interval_force_and_keep_last_k(ckdir):
    state = make_state(0)
    with Checkpointer(ckdir, CheckpointConfig(every=10, keep=2)) as ck:
        saved = [s for s in range(0, 45) if ck.save(s, state, {"step": s})]
        assert saved == [0, 10, 20, 30, 40]
        assert ck.save(43, state, {"step": 43}, force=True)  # e.g. the final step
        assert not ck.save(43, state, {}, force=True)  # already on disk: never overwritten
        ck.wait()
        assert ck.all_steps() == [40, 43]
    assert sorted(p.name for p in ckdir.iterdir() if p.is_dir()) == ["40", "43"]
    with Checkpointer(ckdir, CheckpointConfig(every=10, keep=2)) as ck:
        step, _, meta = ck.restore_latest(state)
    assert (step, meta) == (43, {"step": 43})


def test_first_step_off_the_interval_is_not_saved(ckdir):
    # The trainer's first call is save(1, ...): orbax's own should_save() would checkpoint it.
    with Checkpointer(ckdir, CheckpointConfig(every=5)) as ck:
        saved = [s for s in range(1, 12) if ck.save(s, make_state(0), {"step": s})]
    assert saved == [5, 10]


def _save_two(ckdir: Path) -> tuple[dict, dict]:
    s10, s20 = make_state(10), make_state(20)
    with Checkpointer(ckdir, CheckpointConfig(every=10)) as ck:
        ck.save(10, s10, {"step": 10})
        ck.save(20, s20, {"step": 20})
    return s10, s20


# tensorstore may log "Event loop is closed" from its worker threads after a failed read; harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncate", "garble", "zero_same_size", "delete_meta", "empty_dir", "fingerprint"])
def test_corrupt_latest_falls_back_with_warning(ckdir, how):
    s10, s20 = _save_two(ckdir)
    latest = ckdir / "20"
    if how == "truncate":
        for f in data_files(latest):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "garble":
        rng = np.random.default_rng(0)
        for f in data_files(latest):
            f.write_bytes(rng.bytes(f.stat().st_size))
    elif how == "zero_same_size":
        for f in data_files(latest):
            f.write_bytes(b"\0" * f.stat().st_size)
    elif how == "delete_meta":
        (latest / "meta" / "metadata").unlink()
    elif how == "fingerprint":  # data that decodes but is not what was saved
        f = latest / "integrity" / "metadata"
        fp = json.loads(f.read_text())
        key = next(k for k in fp if "head" in k and "kernel" in k and "params" in k)
        fp[key][0] ^= 1
        f.write_text(json.dumps(fp))
    elif how == "empty_dir":
        shutil.rmtree(latest)
        latest.mkdir()
    with Checkpointer(ckdir, CheckpointConfig(every=10)) as ck:
        with pytest.warns(RuntimeWarning, match=r"checkpoint step 20 .* unreadable"):
            step, restored, meta = ck.restore_latest(make_state(0))
        assert (step, meta) == (10, {"step": 10})
        assert_bit_identical(restored, s10)
        # The corrupt step is set aside, so the resumed run can save step 20 again.
        assert (ckdir / "20.corrupt").is_dir() and ck.all_steps() == [10]
        assert ck.save(20, s20, {"step": 20, "resumed": True})
        ck.wait()
        step, restored, meta = ck.restore_latest(make_state(0))
    assert (step, meta["resumed"]) == (20, True)
    assert_bit_identical(restored, s20)


def test_silent_bit_flip_is_caught_by_fingerprint(ckdir):
    # Values that decode fine but differ from what was saved must not be accepted.
    state = make_state(0)
    fp = fingerprint(state)
    flipped = jax.tree.map(lambda x: x, state)
    w = np.asarray(flipped["params"]["head"]["kernel"]).copy()
    w.view(np.uint32)[0, 0] ^= 1  # one low mantissa bit
    flipped["params"]["head"]["kernel"] = jnp.asarray(w)
    assert fingerprint(flipped) != fp
    swapped = dict(state, params=dict(state["params"], wte={"embedding": state["params"]["wte"]["embedding"][::-1]}))
    assert fingerprint(swapped) != fp  # permutation of the same values


def test_unfinalized_tmp_dir_is_ignored(ckdir):
    s10, _ = _save_two(ckdir)
    shutil.rmtree(ckdir / "20")
    tmp = ckdir / "30.orbax-checkpoint-tmp-1700000000"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "junk").write_bytes(b"partial write")
    with Checkpointer(ckdir, CheckpointConfig(every=10)) as ck:
        assert ck.all_steps() == [10]
        step, restored, _ = ck.restore_latest(make_state(0))
    assert step == 10
    assert_bit_identical(restored, s10)


def test_no_checkpoint_returns_none(ckdir):
    with Checkpointer(ckdir, CheckpointConfig()) as ck:
        assert ck.restore_latest(make_state(0)) is None


def test_all_corrupt_or_mismatched_template_raises_and_renames_nothing(ckdir):
    _save_two(ckdir)
    wrong = {"params": {"other": jnp.zeros((3,))}}
    with Checkpointer(ckdir, CheckpointConfig(every=10)) as ck:
        with pytest.warns(RuntimeWarning), pytest.raises(CorruptCheckpointError, match="step 20.*step 10"):
            ck.restore_latest(wrong)
    assert sorted(p.name for p in ckdir.iterdir() if p.is_dir()) == ["10", "20"]


def test_disabled_writes_nothing(ckdir):
    with Checkpointer(ckdir, CheckpointConfig(enabled=False)) as ck:
        assert not ck.save(0, make_state(0), {}, force=True)
        assert ck.restore_latest(make_state(0)) is None
    assert not ckdir.exists()


@pytest.mark.parametrize("kwargs,match", [({"every": 0}, r"checkpoint\.every=0"), ({"keep": -1}, r"checkpoint\.keep=-1")])
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CheckpointConfig(**kwargs)


def test_bad_meta_and_step_rejected_before_writing(ckdir):
    with Checkpointer(ckdir, CheckpointConfig(every=1)) as ck:
        with pytest.raises(ValueError, match="not JSON-serializable"):
            ck.save(1, make_state(0), {"x": object()})
        with pytest.raises(ValueError, match="step=-1"):
            ck.save(-1, make_state(0), {})
        with pytest.raises(ValueError, match="not JSON-serializable"):  # also off-interval when forced
            ck.save(7, make_state(0), {"x": {1, 2}}, force=True)
        assert ck.all_steps() == []
    assert [p for p in ckdir.iterdir() if p.is_dir()] == []


SHARDED_SCRIPT = r"""
import sys, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scaling.train.checkpoint import CheckpointConfig, Checkpointer
mesh = Mesh(np.array(jax.devices()), ("data",))
row, rep = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P())
state = {"kernel": jax.device_put(jnp.arange(32.0).reshape(8, 4), row), "count": jax.device_put(jnp.int32(7), rep)}
with Checkpointer(sys.argv[1], CheckpointConfig(every=1)) as ck:
    ck.save(1, state, {})
template = {"kernel": jax.device_put(jnp.zeros((8, 4)), row), "count": jax.device_put(jnp.int32(0), rep)}
with Checkpointer(sys.argv[1], CheckpointConfig(every=1)) as ck:
    step, got, _ = ck.restore_latest(template)
assert step == 1 and got["kernel"].sharding == row and got["count"].sharding == rep, got
assert len(got["kernel"].addressable_shards) == 2
np.testing.assert_array_equal(np.asarray(got["kernel"]), np.arange(32.0).reshape(8, 4))
print("SHARDED_OK", got["kernel"].sharding.spec)
"""


def test_restore_keeps_template_sharding_across_devices(ckdir):
    # Two host-platform devices need XLA_FLAGS before jax starts, hence a subprocess.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(ckdir)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and "SHARDED_OK" in out.stdout, out.stderr[-3000:]

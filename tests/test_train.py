import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scaling.accounting import count_params, flops_per_token
from scaling.train.checkpoint import CheckpointConfig, Checkpointer
from scaling.config import Config, TrainConfig, resolve_budget
from scaling.data.tokens import DataConfig
from scaling.data.tokenizers import TokenizerConfig
from scaling.model.decoder import ModelConfig, init_params, loss_fn
from scaling.train.optim import OptimConfig
from scaling.data.synthetic import SyntheticConfig
from scaling.train.tracking import LoggingConfig, read_metrics
from scaling.train.loop import make_train_step, train

REPO = Path(__file__).resolve().parent.parent
V = 32  # synthetic symbols; the tokenizer adds an end-of-text id


def tiny_config(tmp_path: Path, **train_kw) -> Config:
    train_kw = {"steps": 12, "batch_size": 8, "eval_every": 6, "eval_tokens": 2048, **train_kw}
    train_kw.setdefault("checkpoint", CheckpointConfig(every=4, keep=2))
    return Config(
        name="tiny",
        model=ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=V + 1, seq_len=16),
        data=DataConfig(
            source="synthetic",
            cache_dir=str(tmp_path / "cache"),
            synthetic=SyntheticConfig(vocab_size=V, n_tokens=50_000, seed=0),
        ),
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        train=TrainConfig(**train_kw),
        logging=LoggingConfig(backend="jsonl", log_every=2, progress="none"),
    )


def test_init_params_is_the_state_a_run_starts_from_bit_for_bit(tmp_path):
    """init_params (tests, the bench, the coordinate check) and the trainer's jitted init give the same parameters:
    run op by op, the normal sampler's kernels came out 1 ulp off."""
    from scaling.train.loop import initial_state_fn
    from scaling.train.sharding import init_sharded

    cfg = tiny_config(tmp_path, seed=3)
    state, _ = init_sharded(initial_state_fn([cfg]), lambda abstract: None)
    params = init_params(cfg.model, jax.random.key(3))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_record_fields_equal_accounting(tmp_path):
    cfg = tiny_config(tmp_path)
    record = train(cfg, tmp_path / "run")
    counts = count_params(cfg.model)
    assert record["status"] == "completed"
    assert (record["N"], record["N_total"], record["N_embedding"]) == (counts.non_embedding, counts.total, counts.embedding)
    assert record["D"] == 12 * 8 * 16
    for conv in ("6N", "kaplan", "chinchilla"):
        assert record[f"C_{conv}"] == flops_per_token(cfg.model, conv) * record["D"]
    assert record["C"] == record["C_chinchilla"]
    on_disk = json.loads((tmp_path / "run" / "record.json").read_text())
    assert on_disk["loss"] == pytest.approx(record["loss"]) and np.isfinite(on_disk["loss"])
    assert on_disk["data"]["entropy_rate"] > 0
    assert on_disk["kernels"] == {"attention": "blocked", "head_loss": "chunked"}  # what "auto" runs on CPU
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [2, 4, 6, 8, 10, 12]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [6, 12]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]


def test_completed_run_is_not_retrained(tmp_path):
    cfg = tiny_config(tmp_path)
    first = train(cfg, tmp_path / "run")
    mtime = (tmp_path / "run" / "record.json").stat().st_mtime_ns
    again = train(cfg, tmp_path / "run")
    assert again == json.loads((tmp_path / "run" / "record.json").read_text())
    assert (tmp_path / "run" / "record.json").stat().st_mtime_ns == mtime
    assert again["loss"] == first["loss"]


def test_other_config_in_same_run_dir_is_refused(tmp_path):
    train(tiny_config(tmp_path, steps=4), tmp_path / "run")
    (tmp_path / "run" / "record.json").unlink()  # even an unfinished run keeps its config
    with pytest.raises(ValueError, match=r"another config \(differs in: train.steps\)"):
        train(tiny_config(tmp_path, steps=6), tmp_path / "run")


def test_budget_by_flops_gives_the_right_steps(tmp_path):
    cfg = tiny_config(tmp_path, steps=None, flops=3e9, flops_convention="6N")
    budget = resolve_budget(cfg.model, cfg.train)
    tokens = 3e9 / flops_per_token(cfg.model, "6N")
    assert budget.steps == round(tokens / (8 * 16))
    assert abs(budget.C["6N"] - 3e9) <= flops_per_token(cfg.model, "6N") * 8 * 16 / 2  # within half a step
    by_tokens = resolve_budget(cfg.model, TrainConfig(tokens=1000, batch_size=8))
    assert by_tokens.steps == 8 and by_tokens.D == 1024  # rounded up: never fewer tokens than asked


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(steps=None), "give exactly one budget .* \\(got none\\)"),
        (dict(steps=5, flops=1e9), "got \\['steps', 'flops'\\]\\): set the others to null"),
    ],
)
def test_budget_errors(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        resolve_budget(ModelConfig(), TrainConfig(**kw))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(steps=-3), "train.steps=-3 is invalid"),
        (dict(steps=3, batch_size=6, grad_accum=4), "train.batch_size=6 is not divisible by train.grad_accum=4"),
        (dict(steps=3, flops_convention="6ND"), "train.flops_convention='6ND' is unknown"),
        (dict(steps=3, divergence_factor=0.5), "train.divergence_factor=0.5 is invalid"),
        (dict(steps=3, batch_size=True), "train.batch_size=True is invalid"),
        (dict(steps=3, steps_per_call=0), "train.steps_per_call=0 is invalid: it must be a positive integer"),
    ],
)
def test_train_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_gradient_accumulation_equals_big_batch():
    model = ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=64, seq_len=16)
    # Plain SGD, so the update is the gradient itself: Adam's first step g/(|g|+eps) would amplify float noise in
    # near-zero gradient entries into sign flips.
    opt = optax.sgd(0.5)
    params = init_params(model, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (8, 17), 0, 64)
    results = []
    for accum in (1, 4):
        state = {"params": params, "opt_state": opt.init(params)}
        state = jax.tree_util.tree_map(jnp.array, state)  # fresh buffers: the step donates its input
        step = make_train_step(model, opt, accum, seed=0)
        new_state, metrics = step(state, batch.reshape(accum, 8 // accum, 17), jnp.asarray(0))
        results.append((new_state["params"], float(metrics["train_loss"])))
    (p1, l1), (p4, l4) = results
    assert l1 == pytest.approx(l4, rel=1e-6)
    # float32 sums in another order: differences at the 1e-8 level.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5), p1, p4)
    assert float(loss_fn(p1, model, batch)) < float(loss_fn(params, model, batch))


@pytest.mark.parametrize("optim, parametrization", [
    (OptimConfig(lr=1e-2, warmup_steps=3, schedule="cosine"), "sp"),
    (OptimConfig(lr=1e-2, warmup_steps=2, schedule="wsd", decay_fraction=0.5), "sp"),
    (OptimConfig(lr=1e-2, warmup_steps=2, schedule="wsd", decay_fraction=0.5, decay_shape="1-sqrt"), "mup"),
])
def test_step_with_the_lr_as_input_equals_the_schedule_compiled_in_bit_for_bit(optim, parametrization):
    # The trainer passes each step's lr into one compiled step per shape (train_step_fn), so that a ladder's branches
    # and every budget share it; that must not change one bit of any update against the schedule inside the step.
    model = ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=64, seq_len=16, parametrization=parametrization,
                        mup_base_d_model=16 if parametrization == "mup" else None,
                        tie_embeddings=parametrization == "sp")
    steps = 10
    inside = optim.build(steps, model)
    lr_input, with_lr = optim.with_lr_input(steps, model)  # what the trainer builds
    params = init_params(model, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (1, 4, 17), 0, 64)
    fresh = lambda: jax.tree_util.tree_map(jnp.array, {"params": params, "opt_state": inside.init(params)})  # noqa: E731
    a, b = fresh(), fresh()
    step_a, step_b = make_train_step(model, inside, 1, seed=0), make_train_step(model, with_lr, 1, seed=0)
    for i in range(steps):
        a, metrics_a = step_a(a, batch, jnp.asarray(i))
        b, metrics_b = step_b(b, batch, jnp.asarray(i), lr_input(jnp.asarray(i)))
        assert float(metrics_a["train_loss"]) == float(metrics_b["train_loss"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert float(metrics_a["train_loss"]) < float(loss_fn(params, model, batch[0]))  # it trained
    # one compiled step for two schedules: the lr's value, not the schedule, is what the step is given
    other = dataclasses.replace(optim, lr=3e-3, warmup_steps=1)
    lowered = [make_train_step(model, o.with_lr_input(steps, model)[1], 1, seed=0)
               .lower(fresh(), batch, jnp.asarray(0), jnp.asarray(1e-2, jnp.float32)).as_text() for o in (optim, other)]
    assert lowered[0] == lowered[1]


def test_chained_steps_equal_single_steps_bit_for_bit():
    # steps_per_call > 1 runs n steps inside one executable (loop.chain_steps): each step must be the single step on
    # its own batch, step number and lr, and the padding rows past n must never run.
    model = ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=64, seq_len=16)
    optim = OptimConfig(lr=1e-2, warmup_steps=2, schedule="cosine")
    lr_input, with_lr = optim.with_lr_input(10, model)
    params = init_params(model, jax.random.key(0))
    fresh = lambda: jax.tree_util.tree_map(jnp.array, {"params": params, "opt_state": optim.build(10, model).init(params)})  # noqa: E731
    batches = jax.random.randint(jax.random.key(1), (8, 1, 4, 17), 0, 64)
    single, chained = make_train_step(model, with_lr, 1, seed=0), make_train_step(model, with_lr, 1, 0, None, 8)
    a, losses_a = fresh(), []
    for i in range(5):
        a, metrics = single(a, batches[i], jnp.asarray(i), lr_input(jnp.asarray(i)))
        losses_a.append(float(metrics["train_loss"]))
    b, metrics_b = chained(fresh(), batches, jnp.asarray(0), jnp.stack([lr_input(jnp.asarray(i)) for i in range(8)]),
                           jnp.asarray(5))
    np.testing.assert_array_equal(np.asarray(metrics_b["train_loss"]), losses_a + [0.0] * 3)  # rows 5..7: not run
    assert float(metrics_b["grad_norm"]) == float(metrics["grad_norm"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _metric_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "mfu")} for row in read_metrics(run_dir / "metrics.jsonl")]


def test_steps_per_call_changes_no_logged_value_checkpoint_or_loss(tmp_path):
    # The loop stops a chunk of steps at every logging, checkpoint and kept step (a ladder's branch points), so the
    # run logs, evaluates and saves exactly where one call per step does, with the same numbers.
    ckpt = CheckpointConfig(every=5, keep=10, keep_steps=[7])
    runs = {}
    for p in (1, 4):
        cfg = tiny_config(tmp_path, steps=13, steps_per_call=p, checkpoint=ckpt)
        cfg.logging.log_every = 3
        runs[p] = (train(cfg, tmp_path / f"p{p}"), _metric_rows(tmp_path / f"p{p}"))
        saved = sorted(int(d.name) for d in (tmp_path / f"p{p}" / "checkpoints").iterdir() if d.name.isdigit())
        assert saved == [5, 7, 10, 13]
    (rec1, rows1), (rec4, rows4) = runs[1], runs[4]
    assert [r["step"] for r in rows4] == [3, 6, 9, 12, 13] and rows4 == rows1
    assert (rec4["loss"], rec4["train_loss"]) == (rec1["loss"], rec1["train_loss"]) and rec4["status"] == "completed"
    assert rec4["tokens_per_s"] > 0


def test_forced_nan_gives_diverged_record(tmp_path):
    cfg = tiny_config(tmp_path, steps=40)
    cfg.optim = OptimConfig(lr=1e4, warmup_steps=0, grad_clip=None, schedule="constant")
    record = train(cfg, tmp_path / "run")
    assert record["status"] == "diverged"
    assert record["diverged_step"] is not None and record["diverged_step"] <= 40
    on_disk = json.loads((tmp_path / "run" / "record.json").read_text())
    assert on_disk["status"] == "diverged" and on_disk["loss"] is None
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")  # the metrics written before are kept
    assert train(cfg, tmp_path / "run") == on_disk  # a relaunch does not train the same divergence again


def test_exception_writes_failed_record(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.model = cfg.model.replace(vocab_size=8)  # smaller than the tokenizer's vocabulary
    with pytest.raises(ValueError, match="vocab"):
        train(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "failed" and "vocab" in record["error"]


def test_corrupt_latest_checkpoint_falls_back_and_run_completes(tmp_path):
    cfg = tiny_config(tmp_path)
    reference = train(cfg, tmp_path / "ref")
    cfg_short = tiny_config(tmp_path)
    run = tmp_path / "run"
    # Simulate a crash after step 8: train 12 steps, then corrupt checkpoint 12 and drop the record.
    train(cfg_short, run)
    (run / "record.json").unlink()
    for f in (run / "checkpoints" / "12").rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and "state" in str(f):
            f.write_bytes(b"\0" * f.stat().st_size)
    with pytest.warns(RuntimeWarning, match="step 12"):
        record = train(cfg, run)
    assert record["status"] == "completed"
    assert record["loss"] == reference["loss"]


def _run_cli(run_dir: Path, cache: Path, steps: int, env_extra=None) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "scaling.train", "model=tiny", "data=synthetic", "logging=none", "train=steps",
        f"train.steps={steps}", "train.batch_size=8", "train.eval_every=1000", "train.eval_tokens=2048",
        "train.checkpoint.every=5", "train.checkpoint.keep=10", "logging.log_every=1",
        "data.synthetic.vocab_size=32", "data.synthetic.n_tokens=50000", "model.vocab_size=33",
        f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final_params(run_dir: Path):
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    from orbax.checkpoint import PyTreeCheckpointer

    return PyTreeCheckpointer().restore(run_dir / "checkpoints" / str(steps[-1]) / "state")


@pytest.mark.slow
def test_resume_after_kill_9_is_bit_identical(tmp_path):
    cache = tmp_path / "cache"
    steps = 60
    ref = _run_cli(tmp_path / "ref", cache, steps)
    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    victim = _run_cli(tmp_path / "run", cache, steps)
    deadline = time.time() + 300
    ckpts = tmp_path / "run" / "checkpoints"
    while time.time() < deadline:
        done = [p for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if any(int(p.name) >= 20 for p in done):
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "run" / "record.json").exists(), "the run finished before it could be killed"
    resumed = _run_cli(tmp_path / "run", cache, steps)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out

    ref_record = json.loads((tmp_path / "ref" / "record.json").read_text())
    run_record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert run_record["status"] == "completed"
    assert run_record["loss"] == ref_record["loss"]  # to the last bit
    losses = lambda d: [(m["step"], m["train_loss"]) for m in read_metrics(d / "metrics.jsonl")]  # noqa: E731
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    ref_params, run_params = _final_params(tmp_path / "ref"), _final_params(tmp_path / "run")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ref_params, run_params)


def test_killed_after_final_checkpoint_before_record_finishes_without_training(tmp_path):
    cfg = tiny_config(tmp_path)
    first = train(cfg, tmp_path / "run")
    (tmp_path / "run" / "record.json").unlink()  # as if killed between the last save and the record
    again = train(cfg, tmp_path / "run")
    assert again["status"] == "completed"
    assert again["loss"] == first["loss"] and again["train_loss"] == first["train_loss"]
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [2, 4, 6, 8, 10, 12]


# --------------------------------------------------------------------------------------------------------------------
# One trainer per run directory, the data a run resumes on, failed starts
# --------------------------------------------------------------------------------------------------------------------
def test_a_run_another_process_holds_is_left_to_it(tmp_path):
    from scaling.train.lock import DirLock

    cfg, run_dir = tiny_config(tmp_path, steps=4), tmp_path / "run"
    held = DirLock(run_dir)
    assert held.acquire()  # a live trainer (this pid stands in for it)
    record = train(cfg, run_dir)
    assert record["status"] == "locked" and "being trained by" in record["error"]
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "record.json").exists()  # nothing touched
    held.release()
    assert train(cfg, run_dir)["status"] == "completed"
    assert not (run_dir / ".lock").exists()


def _local_corpus_config(tmp_path: Path, corpus: Path) -> Config:
    cfg = tiny_config(tmp_path, steps=8)
    cfg.data = DataConfig(source="local", path=str(corpus), cache_dir=str(tmp_path / "cache"), val_fraction=0.1,
                          doc_bytes=2000, tokenizer=TokenizerConfig(kind="bytes"))
    cfg.model = cfg.model.replace(vocab_size=257)
    return cfg


def test_resume_refuses_other_data_at_the_same_path(tmp_path):
    corpus = tmp_path / "corpus.txt"
    paragraphs = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog, again and again." for i in range(400)]
    corpus.write_text("\n\n".join(paragraphs))
    cfg, run_dir = _local_corpus_config(tmp_path, corpus), tmp_path / "run"
    train(cfg, run_dir)
    (run_dir / "record.json").unlink()  # as if killed after its final checkpoint
    corpus.write_text("\n\n".join(p.upper() for p in paragraphs))  # same path, other content
    with pytest.raises(ValueError, match=r"was trained on other data than the run's config gives now \(source "):
        train(cfg, run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]  # nothing already written is lost
    corpus.write_text("\n\n".join(paragraphs))  # the original data back: the run finishes from its checkpoint
    assert train(cfg, run_dir)["status"] == "completed"


def test_refused_single_run_prints_one_line_exits_2_and_leaves_nothing(tmp_path):
    common = ["model=tiny", "data=synthetic", "logging=none", "model.vocab_size=33", "data.synthetic.vocab_size=32",
              "data.synthetic.n_tokens=50000", f"data.cache_dir={tmp_path / 'cache'}", "name=probe",
              "train.batch_size=8", "train.eval_tokens=2048"]
    out = subprocess.run([sys.executable, "-m", "scaling.train", *common, "train.flops=2e9", "train.tokens=1e4"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: train: give exactly one budget among train.steps, train.tokens and train.flops (got ['tokens', "
        "'flops']): set the others to null, e.g. train.tokens=null."]
    assert not (tmp_path / "runs" / "probe").exists()
    # the corrected command is not refused by anything the failed one left
    out = subprocess.run([sys.executable, "-m", "scaling.train", *common, "train.flops=null", "train.tokens=1e4"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "runs" / "probe" / "record.json").read_text())["status"] == "completed"

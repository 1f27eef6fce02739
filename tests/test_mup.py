"""µP (scaling/model/mup.py): the coordinate check, the per-layer lr and init, the attention scale and output multiplier
on every implementation, the vmapped optimizer, a trained run that samples, and the config errors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling.model.coord_check import coord_check, growth
from scaling.eval.sample import generate, load_run
from scaling.model import mup
from scaling.model.decoder import ModelConfig, cross_entropy, init_params, loss_fn
from scaling.train.loop import make_train_step, train
from scaling.train.optim import OptimConfig
from scaling.train.stack import init_many, make_multi_step, unit_lr_optimizer
from test_train import tiny_config

BASE = 16
MUP = ModelConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=64, seq_len=16, parametrization="mup",
                  mup_base_d_model=BASE, tie_embeddings=False)  # width multiplier m = 4, head dim K = 16


def _tokens(cfg: ModelConfig, length: int, batch: int = 2, seed: int = 1) -> jnp.ndarray:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size)


def _names(path) -> list[str]:
    return [str(getattr(k, "key", k)) for k in path]


def scale_queries(params: dict, c: float) -> dict:
    """The same params with every block's query projection (the first D columns of qkv) times c: under SP the scores
    become c q.k / sqrt(K), so c = 1/sqrt(K) gives µP's q.k / K."""

    def f(path, x):
        if "qkv" not in _names(path):
            return x
        D = x.shape[-1] // 3
        return x.at[..., :D].multiply(c)

    return jax.tree_util.tree_map_with_path(f, params)


def sp_reference_logits(cfg: ModelConfig, params: dict, tokens_BxL: jnp.ndarray) -> jnp.ndarray:
    """What µP's forward must equal: the SP forward (same implementation) with µP's attention scale put into the
    queries, and the logits times the output multiplier b/d_model."""
    sp = cfg.replace(parametrization="sp")
    c = math.sqrt(cfg.head_dim) / cfg.head_dim  # (1/K) / (1/sqrt(K))
    logits_BxLxV = sp.build().apply({"params": scale_queries(params, c)}, tokens_BxL)
    return logits_BxLxV * (cfg.mup_base_d_model / cfg.d_model)


# ---------------------------------------------------------------------------------------------------------------------
# The coordinate check (Yang et al. 2022; the mup README's "coord check")
# ---------------------------------------------------------------------------------------------------------------------
def test_coordinate_check_flat_across_widths_under_mup_and_growing_under_sp():
    """Depth 2, widths 32..512 (4 heads, so the head dim grows 8..128), 4 Adam steps at lr 1e-2 on one batch.
    Measured (RMS at width 512 / RMS at width 32 after 4 steps): µP 0.50..1.05 for every layer; SP embedding 0.84,
    attention and MLP outputs 125..288, logits 13.5. The einsum / reference kernels compile faster than the CPU ones
    and compute the same (tests/test_model.py)."""
    tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, 256)
    base = ModelConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=256, seq_len=16, attention="einsum",
                       head_loss="reference", parametrization="mup", mup_base_d_model=32, tie_embeddings=False)
    mu = coord_check(base, [32, 64, 128, 256, 512], tokens, steps=4, lr=1e-2)
    sp = coord_check(base.replace(parametrization="sp"), [32, 512], tokens, steps=4, lr=1e-2)
    layers = {"embedding", "block_0.attn", "block_0.mlp", "block_1.attn", "block_1.mlp", "logits"}
    assert set(mu[32]) == layers
    for d in (64, 128, 256, 512):  # flat at every width, not only at the ends
        for name in layers:
            assert 1 / 3 < mu[d][name][-1] / mu[32][name][-1] < 3, (d, name, mu[d][name], mu[32][name])
    sp_growth = growth(sp)
    for name in layers - {"embedding", "logits"}:
        assert sp_growth[name] > 40, (name, sp_growth)
    assert sp_growth["logits"] > 4, sp_growth
    assert 1 / 3 < sp_growth["embedding"] < 3  # the input layer is the same under both (Table 3: lr, init constant)


# ---------------------------------------------------------------------------------------------------------------------
# Per-layer lr multipliers, init, weight decay
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scan_layers", [False, True])
def test_lr_multipliers_by_kind_of_parameter(scan_layers):
    cfg = MUP.replace(scan_layers=scan_layers)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))  # the tree is all the rule reads
    seen = set()
    for path, m in jax.tree_util.tree_flatten_with_path(mup.lr_multipliers(cfg, params))[0]:
        names = _names(path)
        if names[-1] == "kernel" and "head" not in names:
            kind, expected = "hidden", BASE / 64
        elif names[-1] == "embedding":
            kind, expected = "embedding", 1.0  # wte and wpe: input weights
        elif "head" in names:
            kind, expected = "head", 1.0  # output weights: their 1/m is the forward multiplier
        else:
            kind, expected = "bias/norm", 1.0
        assert m == expected, (names, m)
        seen.add(kind)
    assert seen == {"hidden", "embedding", "bias/norm", "head"}
    sp = mup.lr_multipliers(MUP.replace(parametrization="sp"), params)
    assert set(jax.tree_util.tree_leaves(sp)) == {1.0}


def test_init_scales_hidden_kernels_by_sqrt_base_over_width_only():
    """Hidden kernels' std 0.02 sqrt(b/d) (variance ∝ 1/fan_in, Table 3); embeddings and the untied head stay 0.02."""
    cfg = MUP.replace(d_model=256, n_layers=1)  # m = 16: hidden std 0.005
    params = init_params(cfg, jax.random.key(0))
    std = lambda x: float(jnp.std(x))  # noqa: E731
    assert std(params["block_0"]["attn"]["qkv"]["kernel"]) == pytest.approx(0.02 / 4, rel=0.03)
    assert std(params["block_0"]["mlp"]["fc"]["kernel"]) == pytest.approx(0.02 / 4, rel=0.03)
    assert std(params["block_0"]["mlp"]["proj"]["kernel"]) == pytest.approx(0.02 / 4 / math.sqrt(2), rel=0.03)
    for leaf in (params["wte"]["embedding"], params["wpe"]["embedding"], params["head"]["kernel"]):
        assert std(leaf) == pytest.approx(0.02, rel=0.05)


def test_mup_update_is_sp_update_times_multiplier_and_decay_is_not():
    """The µP optimizer's step on each leaf is the SP optimizer's times the leaf's multiplier (Adam's part), while the
    decoupled decay is lr * weight_decay * theta at every width (the mup package's convention, see optim.py)."""
    params = init_params(MUP, jax.random.key(0))
    grads = jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
    no_decay = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=None)
    u_mup, _ = no_decay.build(10, MUP).update(grads, no_decay.build(10, MUP).init(params), params)
    u_sp, _ = no_decay.build(10).update(grads, no_decay.build(10).init(params), params)
    mult = mup.lr_multipliers(MUP, params)
    jax.tree_util.tree_map(lambda a, b, m: np.testing.assert_allclose(a, m * b, rtol=1e-6, atol=1e-9),
                           u_mup, u_sp, mult)
    decay = dataclasses.replace(no_decay, weight_decay=0.1)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, grads)
    u_decay, _ = decay.build(10, MUP).update(zeros, decay.build(10, MUP).init(params), params)
    kernel = params["block_0"]["mlp"]["fc"]["kernel"]
    np.testing.assert_allclose(u_decay["block_0"]["mlp"]["fc"]["kernel"], -1e-2 * 0.1 * kernel, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# The forward: µP at the base width is SP but for the attention; the scale and multiplier on every implementation
# ---------------------------------------------------------------------------------------------------------------------
def test_mup_at_base_width_is_sp_except_the_attention_scale():
    sp = ModelConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=64, seq_len=16, attention="einsum",
                     tie_embeddings=False)
    at_base = sp.replace(parametrization="mup", mup_base_d_model=32)
    params = init_params(at_base, jax.random.key(0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, init_params(sp, jax.random.key(0)))  # same init
    assert set(jax.tree_util.tree_leaves(mup.lr_multipliers(at_base, params))) == {1.0}  # same optimizer
    tokens = _tokens(sp, 16)
    out_mup = at_base.build().apply({"params": params}, tokens)
    out_sp = sp.build().apply({"params": scale_queries(params, 1 / math.sqrt(sp.head_dim))}, tokens)
    np.testing.assert_allclose(out_mup, out_sp, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(out_mup - sp.build().apply({"params": params}, tokens)))) > 1e-4  # 1/K != 1/sqrt(K)


@pytest.mark.parametrize("attention", ["einsum", "xla", "blocked"])
def test_attention_scale_and_output_multiplier_on_every_implementation(attention):
    cfg = MUP.replace(attention=attention, attention_block=4)
    params = init_params(cfg, jax.random.key(0))
    batch = _tokens(cfg, 17)
    expected = sp_reference_logits(cfg, params, batch[:, :-1])
    np.testing.assert_allclose(cfg.build().apply({"params": params}, batch[:, :-1]), expected, rtol=1e-5, atol=1e-6)
    grads = {}
    for head_loss in ("chunked", "reference"):
        c = cfg.replace(head_loss=head_loss)
        loss, grads[head_loss] = jax.value_and_grad(loss_fn)(params, c, batch)
        assert float(loss) == pytest.approx(float(cross_entropy(expected, batch[:, 1:])), rel=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads["chunked"],
                           grads["reference"])


@pytest.mark.parametrize("attention", ["auto", "einsum"])
def test_kv_cache_decoding_under_mup_equals_the_full_forward(attention):
    cfg = MUP.replace(attention=attention, pos_encoding="rotary")
    model = cfg.build()
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(cfg, 16)
    expected = sp_reference_logits(cfg, params, tokens)
    np.testing.assert_allclose(model.apply({"params": params}, tokens), expected, rtol=1e-5, atol=1e-6)
    cache = model.init(jax.random.key(0), jnp.zeros_like(tokens), decode=True)["cache"]
    logits, mutated = model.apply({"params": params, "cache": cache}, tokens[:, :13], jnp.arange(13), decode=True,
                                  mutable=["cache"])
    outs = [logits]
    for t in range(13, 16):
        logits, mutated = model.apply({"params": params, "cache": mutated["cache"]}, tokens[:, t:t + 1],
                                      jnp.array([t]), decode=True, mutable=["cache"])
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The vmapped K > 1 optimizer; a trained µP run restores and samples
# ---------------------------------------------------------------------------------------------------------------------
def test_vmapped_step_under_mup_equals_separate_steps():
    lrs, seeds, steps = [3e-3, 3e-2], [0, 1], 3
    base = OptimConfig(lr=3e-3, warmup_steps=1)
    opt = unit_lr_optimizer(base, 10, MUP)
    state = init_many(MUP, opt, seeds, lrs)
    batch = _tokens(MUP, 17, batch=8)[None]
    step = make_multi_step(MUP, opt, 1, 0, shared_batch=True)
    for s in range(steps):
        state, _ = step(state, batch, jnp.asarray(s))
    for k in (1,):  # the larger lr: the per-layer multipliers must act the same on both paths
        single_opt = dataclasses.replace(base, lr=lrs[k]).build(10, MUP)
        params = init_params(MUP, jax.random.key(seeds[k]))
        single = {"params": params, "opt_state": single_opt.init(params)}
        one_step = make_train_step(MUP, single_opt, 1, 0)
        for s in range(steps):
            single, _ = one_step(single, batch, jnp.asarray(s))
        # As in tests/test_multi.py: equal to a small fraction of the total movement (steps * lr), not bitwise.
        for a, b in zip(jax.tree_util.tree_leaves(state["params"]), jax.tree_util.tree_leaves(single["params"])):
            np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b), atol=0.05 * lrs[k] * steps)


def test_trained_mup_run_restores_and_samples(tmp_path):
    cfg = tiny_config(tmp_path, steps=4, eval_every=4)
    cfg.model = cfg.model.replace(parametrization="mup", mup_base_d_model=16, tie_embeddings=False)
    record = train(cfg, tmp_path / "run")
    assert record["status"] == "completed" and np.isfinite(record["loss"])
    loaded, params = load_run(tmp_path / "run")  # the opt_state template must be µP's for the restore
    assert loaded.model == cfg.model
    assert len(generate(loaded.model, params, [1, 2, 3], max_new_tokens=6, temperature=0.0)) == 6


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(parametrization="ntk"), "model.parametrization='ntk' is unknown: use one of ('sp', 'mup')"),
        (dict(mup_base_d_model=128), "model.mup_base_d_model=128 exceeds model.d_model=64"),
        (dict(mup_base_d_model=0), "model.mup_base_d_model=0 is invalid: give a positive integer"),
        (dict(mup_base_d_model=-8), "model.mup_base_d_model=-8 is invalid"),
        (dict(mup_base_d_model=None), "model.mup_base_d_model=None with model.parametrization=mup: set it"),
        (dict(tie_embeddings=True), "model.parametrization=mup with model.tie_embeddings=true: µP needs an untied head"),
    ],
)
def test_bad_mup_config_is_one_clear_error(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MUP.replace(**changes)


def test_base_width_is_ignored_under_sp():
    """So a sweep can flip model.parametrization alone: the SP model is the same with or without a base width."""
    sp = MUP.replace(parametrization="sp")
    plain = ModelConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=64, seq_len=16, tie_embeddings=False)
    tokens = _tokens(sp, 16)
    params = init_params(sp, jax.random.key(0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, init_params(plain, jax.random.key(0)))
    np.testing.assert_array_equal(sp.build().apply({"params": params}, tokens),
                                  plain.build().apply({"params": params}, tokens))

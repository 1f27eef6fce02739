import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scaling.model import (
    POS_ENCODINGS,
    ModelConfig,
    apply_rotary,
    cross_entropy,
    init_params,
    loss_fn,
    sinusoidal_table,
)

TINY = dict(d_model=32, n_layers=2, n_heads=4, vocab_size=64, seq_len=16)


def _tokens(cfg: ModelConfig, batch: int = 2, length: int | None = None, seed: int = 1) -> jnp.ndarray:
    return jax.random.randint(jax.random.key(seed), (batch, length or cfg.seq_len), 0, cfg.vocab_size)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_gradient_is_causal(pos_encoding):
    """d loss_t / d x_s == 0 exactly for s > t, and nonzero for s <= t (the input embeddings x)."""
    cfg = ModelConfig(**TINY, pos_encoding=pos_encoding)
    params = init_params(cfg, jax.random.key(0))
    tokens_BxL = _tokens(cfg)
    t = 7

    def loss_at_t(delta_BxLxD):
        def add_delta(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.module.name == "wte" and context.method_name == "__call__":
                out = out + delta_BxLxD
            return out

        with nn.intercept_methods(add_delta):
            logits_BxLxV = cfg.build().apply({"params": params}, tokens_BxL)
        return cross_entropy(logits_BxLxV[:, t], tokens_BxL[:, t])

    grad_BxLxD = jax.grad(loss_at_t)(jnp.zeros((2, cfg.seq_len, cfg.d_model)))
    assert np.all(np.asarray(grad_BxLxD[:, t + 1 :]) == 0.0)
    assert np.all(np.abs(np.asarray(grad_BxLxD[:, : t + 1])).sum(axis=-1) > 0)


def test_initial_loss_is_log_vocab():
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=512, seq_len=32)
    params = init_params(cfg, jax.random.key(0))
    loss = loss_fn(params, cfg, _tokens(cfg, batch=8, length=cfg.seq_len + 1))
    assert abs(float(loss) - math.log(cfg.vocab_size)) < 0.1


def test_tiny_model_overfits_one_batch():
    cfg = ModelConfig(**TINY)
    params = init_params(cfg, jax.random.key(0))
    batch = _tokens(cfg, batch=4, length=cfg.seq_len + 1)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params, cfg, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(200):
        params, state, loss = step(params, state)
    assert float(loss) < 0.1


def test_sinusoidal_matches_vaswani_formula():
    L, D = 12, 10
    table = np.asarray(sinusoidal_table(L, D))
    for pos in range(L):
        for i in range(D // 2):
            angle = pos / 10000 ** (2 * i / D)
            assert table[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-5)


def test_rotary_preserves_norm_and_depends_on_relative_position_only():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

    def rot(x, p):
        return apply_rotary(x, jnp.array([p]), 10000.0)

    for p in (0, 3, 50):
        np.testing.assert_allclose(jnp.linalg.norm(rot(q, p)), jnp.linalg.norm(q), rtol=1e-5)
    score = lambda p1, p2: float(jnp.sum(rot(q, p1) * rot(k, p2)))  # noqa: E731
    for shift in (1, 7, 100):
        assert score(5, 2) == pytest.approx(score(5 + shift, 2 + shift), rel=1e-4, abs=1e-5)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3  # and it does depend on the relative position


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_einsum_and_dot_product_attention_agree(pos_encoding):
    # float32 on CPU: both paths compute the same softmax in float32; differences are summation order, ~1e-6.
    ref = ModelConfig(**TINY, pos_encoding=pos_encoding, attention="einsum")
    fast = ref.replace(attention="xla")
    params = init_params(ref, jax.random.key(0))
    tokens = _tokens(ref)
    out_ref = ref.build().apply({"params": params}, tokens)
    out_fast = fast.build().apply({"params": params}, tokens)
    np.testing.assert_allclose(out_ref, out_fast, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_kv_cache_decoding_equals_full_forward(pos_encoding):
    cfg = ModelConfig(**TINY, pos_encoding=pos_encoding)
    model = cfg.build()
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(cfg)
    full = model.apply({"params": params}, tokens)
    cache = model.init(jax.random.key(0), jnp.zeros_like(tokens), decode=True)["cache"]
    prefill = 5
    logits, mutated = model.apply(
        {"params": params, "cache": cache}, tokens[:, :prefill], jnp.arange(prefill), decode=True, mutable=["cache"]
    )
    outs = [logits]
    for t in range(prefill, cfg.seq_len):
        logits, mutated = model.apply(
            {"params": params, "cache": mutated["cache"]},
            tokens[:, t : t + 1],
            jnp.array([t]),
            decode=True,
            mutable=["cache"],
        )
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=1e-5)


def test_bf16_compute_keeps_float32_params_and_logits():
    cfg = ModelConfig(**TINY, compute_dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    logits = cfg.build().apply({"params": params}, _tokens(cfg))
    assert logits.dtype == jnp.float32
    ref = cfg.replace(compute_dtype="float32").build().apply({"params": params}, _tokens(cfg))
    np.testing.assert_allclose(logits, ref, atol=0.05)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_gives_same_gradients(remat):
    cfg = ModelConfig(**TINY)
    params = init_params(cfg, jax.random.key(0))
    batch = _tokens(cfg, length=cfg.seq_len + 1)
    g0 = jax.grad(loss_fn)(params, cfg, batch)
    g1 = jax.grad(loss_fn)(params, cfg.replace(remat=remat), batch)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_cross_entropy_mask_ignores_masked_tokens():
    logits = jax.random.normal(jax.random.key(0), (1, 4, 8))
    targets = jnp.array([[1, 2, 3, 4]])
    mask = jnp.array([[1, 1, 0, 0]])
    expected = cross_entropy(logits[:, :2], targets[:, :2])
    assert float(cross_entropy(logits, targets, mask)) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(d_model=30, n_heads=4), "not divisible by model.n_heads=4"),
        (dict(d_model=20, n_heads=4, pos_encoding="rotary"), "even head dim"),
        (dict(n_layers=0), "model.n_layers=0 is invalid"),
        (dict(d_model=-8), "model.d_model=-8 is invalid"),
        (dict(d_ff=0), "model.d_ff=0 is invalid"),
        (dict(pos_encoding="alibi"), "model.pos_encoding='alibi' is unknown"),
        (dict(compute_dtype="float16"), "model.compute_dtype='float16' is unknown"),
        (dict(param_dtype="fp8"), "model.param_dtype='fp8' is unknown"),
        (dict(remat="some"), "model.remat='some' is unknown"),
        (dict(attention="flash"), "model.attention='flash' is unknown"),
        (dict(dropout=1.5), "model.dropout=1.5 is invalid"),
    ],
)
def test_bad_config_raises_clear_error(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**{**TINY, **changes})


def unstack_layers(scanned_params: dict, n_layers: int) -> dict:
    """The unrolled model's params from the scanned model's (stacked on a leading layer axis)."""
    params = {k: v for k, v in scanned_params.items() if k != "blocks"}
    for i in range(n_layers):
        params[f"block_{i}"] = jax.tree_util.tree_map(lambda x: x[i], scanned_params["blocks"]["block"])
    return params


@pytest.mark.parametrize("remat", ["none", "dots_saveable"])
def test_scan_layers_equals_unrolled_model(remat):
    cfg = ModelConfig(**{**TINY, "n_layers": 3}, remat=remat)
    scan_cfg = cfg.replace(scan_layers=True)
    scanned = init_params(scan_cfg, jax.random.key(0))
    assert jax.tree_util.tree_leaves(scanned["blocks"])[0].shape[0] == 3
    unrolled = unstack_layers(scanned, 3)
    tokens = _tokens(cfg)
    np.testing.assert_allclose(
        scan_cfg.build().apply({"params": scanned}, tokens), cfg.build().apply({"params": unrolled}, tokens), atol=1e-5
    )
    batch = _tokens(cfg, length=cfg.seq_len + 1)
    g_scan = unstack_layers(jax.grad(loss_fn)(scanned, scan_cfg, batch), 3)
    g_unrolled = jax.grad(loss_fn)(unrolled, cfg, batch)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_scan, g_unrolled)


def test_scan_layers_kv_cache_decoding_equals_full_forward():
    cfg = ModelConfig(**TINY, pos_encoding="rotary", scan_layers=True)
    model = cfg.build()
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(cfg)
    full = model.apply({"params": params}, tokens)
    cache = model.init(jax.random.key(0), jnp.zeros_like(tokens), decode=True)["cache"]
    logits, mutated = model.apply(
        {"params": params, "cache": cache}, tokens[:, :9], jnp.arange(9), decode=True, mutable=["cache"]
    )
    last, _ = model.apply(
        {"params": params, "cache": mutated["cache"]}, tokens[:, 9:10], jnp.array([9]), decode=True, mutable=["cache"]
    )
    np.testing.assert_allclose(jnp.concatenate([logits, last], axis=1), full[:, :10], atol=1e-5)

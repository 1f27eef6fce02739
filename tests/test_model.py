import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scaling.model import decoder
from scaling.model.attention import blocked_causal_attention, query_blocks
from scaling.model.head_loss import head_cross_entropy
from scaling.model.decoder import (
    POS_ENCODINGS,
    ModelConfig,
    apply_rotary,
    cross_entropy,
    einsum_attention,
    init_params,
    loss_fn,
    resolve_attention,
    resolve_head_loss,
    sinusoidal_table,
)

TINY = dict(d_model=32, n_layers=2, n_heads=4, vocab_size=64, seq_len=16)


def _tokens(cfg: ModelConfig, batch: int = 2, length: int | None = None, seed: int = 1) -> jnp.ndarray:
    return jax.random.randint(jax.random.key(seed), (batch, length or cfg.seq_len), 0, cfg.vocab_size)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_gradient_is_causal(pos_encoding):
    """d loss_t / d x_s == 0 exactly for s > t, and nonzero for s <= t (the input embeddings x)."""
    cfg = ModelConfig(**TINY, pos_encoding=pos_encoding, attention_block=4)  # on CPU: 4 blocked query blocks
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
        (dict(attention_block=0), "model.attention_block=0 is invalid"),
        (dict(head_loss="fused"), "model.head_loss='fused' is unknown"),
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


def _qkv(L: int, seed: int = 0, B: int = 2, H: int = 3, K: int = 8):
    return tuple(jax.random.normal(k, (B, L, H, K)) for k in jax.random.split(jax.random.key(seed), 3))


@pytest.mark.parametrize("L, block", [(16, 4), (13, 4), (7, 16), (33, 8), (5, 1)])
def test_blocked_attention_equals_reference_values_and_gradients(L, block):
    """Odd lengths (a short last block) and a block longer than L included; gradients through the custom VJP."""
    q, k, v = _qkv(L)
    mask_LxL = jnp.tril(jnp.ones((L, L), bool))
    w = jax.random.normal(jax.random.key(9), q.shape)  # a loss that weighs every output differently

    def ref_loss(q, k, v):
        return jnp.sum(w * einsum_attention(q, k, v, mask_LxL))

    def blocked_loss(q, k, v):
        return jnp.sum(w * blocked_causal_attention(q, k, v, block))

    np.testing.assert_allclose(blocked_causal_attention(q, k, v, block), einsum_attention(q, k, v, mask_LxL),
                               atol=1e-5, rtol=1e-5)
    for g_blocked, g_ref in zip(jax.grad(blocked_loss, (0, 1, 2))(q, k, v), jax.grad(ref_loss, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g_blocked, g_ref, atol=1e-5, rtol=1e-4)


def test_blocked_attention_gradient_is_causal():
    """Output t depends on keys/values s <= t only: exact zeros beyond t, in every query block, through the VJP."""
    L, t = 13, 6
    q, k, v = _qkv(L, seed=3)
    assert len(query_blocks(L, 4)) == 4 and query_blocks(L, 4)[-1] == (12, 13)
    grads = jax.grad(lambda q, k, v: jnp.sum(blocked_causal_attention(q, k, v, 4)[:, t]), (0, 1, 2))(q, k, v)
    dq, dk, dv = (np.asarray(g) for g in grads)
    assert np.all(dk[:, t + 1 :] == 0.0) and np.all(dv[:, t + 1 :] == 0.0)
    assert np.all(dq[:, np.arange(L) != t] == 0.0)
    assert np.all(np.abs(dk[:, :t]).sum(axis=(-1, -2)) > 0) and np.all(np.abs(dv[:, : t + 1]).sum(axis=(-1, -2)) > 0)


@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
@pytest.mark.parametrize("seq_len", [16, 13])
def test_blocked_model_loss_and_gradients_equal_reference(pos_encoding, seq_len):
    """The whole model's loss within 1e-5 relative, and its gradients, with the blocked and the einsum attention."""
    ref = ModelConfig(**{**TINY, "seq_len": seq_len}, pos_encoding=pos_encoding, attention="einsum")
    fast = ref.replace(attention="blocked", attention_block=4)  # 4 query blocks, the last one short when L = 13
    _assert_same_loss_and_gradients(ref, fast, length=seq_len + 1)


def _assert_same_loss_and_gradients(ref: ModelConfig, fast: ModelConfig, length: int) -> None:
    params = init_params(ref, jax.random.key(0))
    batch = _tokens(ref, length=length)
    loss_ref, g_ref = jax.value_and_grad(loss_fn)(params, ref, batch)
    loss_fast, g_fast = jax.value_and_grad(loss_fn)(params, fast, batch)
    assert float(loss_fast) == pytest.approx(float(loss_ref), rel=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g_fast, g_ref)


def test_auto_attention_is_blocked_for_cpu_training_only():
    on_cpu = jax.default_backend() == "cpu"
    assert resolve_attention("auto") == ("blocked" if on_cpu else "auto")
    assert resolve_attention("auto", decode=True) == "auto"  # a KV cache is not causal blocks of the queries
    assert resolve_attention("blocked", decode=True) == "auto"
    for explicit in ("xla", "cudnn", "einsum"):
        assert resolve_attention(explicit) == explicit


@pytest.mark.parametrize("N, chunk", [(12, 4), (13, 4), (5, 16)])
def test_chunked_head_loss_equals_reference_cross_entropy_values_and_gradients(N, chunk):
    """N not a multiple of the chunk (padded rows must weigh nothing), and a chunk longer than N."""
    D, V = 8, 11
    kx, kw, kt = jax.random.split(jax.random.key(0), 3)
    x_NxD, w_VxD = jax.random.normal(kx, (N, D)), jax.random.normal(kw, (V, D))
    targets_N = jax.random.randint(kt, (N,), 0, V)

    def reference(x, w):
        return cross_entropy((x @ w.T)[None], targets_N[None])

    def chunked(x, w):
        return head_cross_entropy(x, w, targets_N, chunk)

    assert float(chunked(x_NxD, w_VxD)) == pytest.approx(float(reference(x_NxD, w_VxD)), rel=1e-6)
    # Scaled by an outer factor: the backward must use the incoming cotangent, not assume 1.
    (l_c, g_c), (l_r, g_r) = (jax.value_and_grad(lambda x, w, f=f: 3.0 * f(x, w), (0, 1))(x_NxD, w_VxD)
                              for f in (chunked, reference))
    assert float(l_c) == pytest.approx(float(l_r), rel=1e-6)
    for a, b in zip(g_c, g_r):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tie_embeddings", [True, False])
@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
def test_cpu_fast_step_loss_and_gradients_equal_reference_model(tie_embeddings, pos_encoding):
    """The whole model with the CPU-fast pieces (blocked attention, chunked head loss; odd L = 13, 4 query blocks,
    26 tokens in chunks) against the reference paths: loss within 1e-5 relative, and the gradients."""
    ref = ModelConfig(**{**TINY, "seq_len": 13}, pos_encoding=pos_encoding, tie_embeddings=tie_embeddings,
                      attention="einsum", head_loss="reference")
    fast = ref.replace(attention="blocked", attention_block=4, head_loss="chunked")
    _assert_same_loss_and_gradients(ref, fast, length=14)


def test_auto_head_loss_is_chunked_for_float32_on_cpu_only():
    on_cpu = jax.default_backend() == "cpu"
    assert resolve_head_loss(ModelConfig(**TINY)) == ("chunked" if on_cpu else "reference")
    assert resolve_head_loss(ModelConfig(**TINY, compute_dtype="bfloat16")) == "reference"
    assert resolve_head_loss(ModelConfig(**TINY, head_loss="reference")) == "reference"


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_dense_layers_multiply_flattened_tokens_with_the_same_math(monkeypatch, tie_embeddings):
    """Every Dense and the tied head contract one dimension (tokens flattened), so no weight gradient contracts two
    (B and L), which XLA:CPU runs as transposes + a slow dot; loss and gradients equal lax.dot_general's over
    [B, L, D] (the untied model; the tied head's reshape is the same math)."""
    cfg = ModelConfig(**TINY, tie_embeddings=tie_embeddings, head_loss="reference")
    params, batch = init_params(cfg, jax.random.key(0)), _tokens(cfg, length=cfg.seq_len + 1)

    def contracted_dims() -> list[str]:  # every dot's lhs contracting dims in the lowered gradient
        text = jax.jit(lambda p, b: jax.grad(loss_fn)(p, cfg, b)).lower(params, batch).as_text()
        return re.findall(r"contracting_dims = \[([\d, ]+)\] x", text)

    flat = contracted_dims()
    assert flat and all("," not in c for c in flat), flat
    if tie_embeddings:
        return
    loss, g = jax.value_and_grad(loss_fn)(params, cfg, batch)
    monkeypatch.setattr(decoder, "tokens_dot_general", jax.lax.dot_general)
    assert any("," in c for c in contracted_dims())  # the check above can fail
    loss_3d, g_3d = jax.value_and_grad(loss_fn)(params, cfg, batch)
    assert float(loss) == pytest.approx(float(loss_3d), rel=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g, g_3d)

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scaling.train.optim import SCHEDULES, OptimConfig, decay_mask, learning_rate_at


def gpt_params(tied: bool = False) -> dict:
    """Hand-made tree shaped like the Flax linen GPT param tree (2 blocks, D=8, V=16, L=4)."""
    D, V, L = 8, 16, 4
    ln = lambda: {"scale": jnp.ones((D,)), "bias": jnp.zeros((D,))}
    dense = lambda i, o, bias=True: {"kernel": jnp.full((i, o), 0.5), **({"bias": jnp.full((o,), 0.5)} if bias else {})}
    block = lambda: {
        "ln_1": ln(),
        "attn": {"qkv": dense(D, 3 * D), "proj": dense(D, D)},
        "ln_2": ln(),
        "mlp": {"fc": dense(D, 4 * D), "proj": dense(4 * D, D)},
    }
    p = {
        "wte": {"embedding": jnp.full((V, D), 0.5)},
        "wpe": {"embedding": jnp.full((L, D), 0.5)},
        "block_0": block(),
        "block_1": block(),
        "ln_f": ln(),
    }
    if not tied:
        p["head"] = dense(D, V, bias=False)
    return p


def lrs(cfg: OptimConfig, num_steps: int, steps) -> np.ndarray:
    f = cfg.schedule_fn(num_steps)
    return np.array([float(f(s)) for s in steps])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_endpoints(schedule):
    lr, n, w = 1e-3, 100, 10
    cfg = OptimConfig(lr=lr, schedule=schedule, warmup_steps=w, min_lr_ratio=0.1, decay_fraction=0.2)
    end = lr if schedule == "constant" else 0.1 * lr
    v = lrs(cfg, n, [0, w // 2, w, n, n + 50])
    np.testing.assert_allclose(v, [0.0, lr / 2, lr, end, end], rtol=1e-6, atol=0)
    # After warmup, never above lr and never below the floor.
    after = lrs(cfg, n, range(w, n + 1))
    assert after.max() <= lr * (1 + 1e-6) and after.min() >= end * (1 - 1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decaying_schedules_are_monotone_with_known_midpoint(schedule):
    lr, n, w = 2e-3, 110, 10
    cfg = OptimConfig(lr=lr, schedule=schedule, warmup_steps=w, min_lr_ratio=0.1)
    v = lrs(cfg, n, range(w, n + 1))
    assert np.all(np.diff(v) < 0)
    # Both cosine (cos(pi/2)=0) and linear sit halfway between lr and the floor at mid-decay.
    np.testing.assert_allclose(lrs(cfg, n, [w + 50])[0], (lr + 0.1 * lr) / 2, rtol=1e-5)
    if schedule == "cosine":  # cosine decays slower than linear early on
        lin = OptimConfig(lr=lr, schedule="linear", warmup_steps=w, min_lr_ratio=0.1)
        assert lrs(cfg, n, [w + 10])[0] > lrs(lin, n, [w + 10])[0]


def test_wsd_flat_until_decay_then_linear_to_floor():
    lr, n = 1e-3, 100
    cfg = OptimConfig(lr=lr, schedule="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0)
    stable = lrs(cfg, n, range(5, 81))
    np.testing.assert_allclose(stable, lr, rtol=1e-6)
    decay = lrs(cfg, n, range(80, 101))
    np.testing.assert_allclose(decay, np.linspace(lr, 0.0, 21), rtol=1e-5, atol=1e-9)


def test_warmup_fraction_and_zero_warmup():
    cfg = OptimConfig(lr=1e-3, schedule="constant", warmup_fraction=0.1)
    assert cfg.resolved_warmup(200) == 20
    v = lrs(cfg, 200, [0, 10, 20])
    np.testing.assert_allclose(v, [0.0, 5e-4, 1e-3], rtol=1e-6)
    cfg0 = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=0, min_lr_ratio=0.5)
    np.testing.assert_allclose(lrs(cfg0, 50, [0, 50]), [1e-3, 5e-4], rtol=1e-6)
    assert learning_rate_at(cfg0, 50, 0) == pytest.approx(1e-3)


@pytest.mark.parametrize("emb,nb", [(False, False), (True, False), (False, True), (True, True)])
def test_decay_mask_rules(emb, nb):
    params = gpt_params()
    mask = decay_mask(params, OptimConfig(decay_embeddings=emb, decay_norms_and_biases=nb))
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
    assert mask["head"]["kernel"] is True
    assert mask["block_1"]["attn"]["qkv"]["kernel"] is True
    assert mask["wte"]["embedding"] is emb and mask["wpe"]["embedding"] is emb
    assert mask["block_0"]["ln_1"]["scale"] is nb and mask["ln_f"]["bias"] is nb
    assert mask["block_0"]["mlp"]["fc"]["bias"] is nb


def test_decay_mask_unknown_names_follow_shape():
    params = {"w": jnp.ones((3, 3)), "g": jnp.ones((3,)), "layers": [{"kernel": jnp.ones((2, 2))}]}
    mask = decay_mask(params, OptimConfig())
    assert mask == {"w": True, "g": False, "layers": [{"kernel": True}]}


def test_weight_decay_only_on_masked_leaves():
    # Zero gradients: Adam's update is 0, so any change is the decoupled decay -lr*wd*param.
    lr, wd = 0.01, 0.1
    cfg = OptimConfig(lr=lr, schedule="constant", warmup_steps=0, weight_decay=wd)
    params = gpt_params(tied=True)
    tx = cfg.build(num_steps=10)
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["block_0"]["attn"]["proj"]["kernel"], 0.5 * (1 - lr * wd), rtol=1e-6)
    np.testing.assert_array_equal(new["block_0"]["attn"]["proj"]["bias"], 0.5)
    np.testing.assert_array_equal(new["wte"]["embedding"], 0.5)
    np.testing.assert_array_equal(new["ln_f"]["scale"], 1.0)


@pytest.mark.parametrize("clip", [1.0, None, 0.0])
def test_global_norm_clipping_reaches_adam_moments(clip):
    cfg = OptimConfig(lr=1e-3, b1=0.9, grad_clip=clip, warmup_steps=0)
    params = {"a": {"kernel": jnp.zeros((4, 4))}, "b": {"bias": jnp.zeros((4,))}}
    grads = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, 10.0), params)  # global norm = 10*sqrt(20)
    tx = cfg.build(num_steps=5)
    _, state = tx.update(grads, tx.init(params), params)
    mu = optax.tree_utils.tree_get(state, "mu")
    mu_norm = float(optax.tree_utils.tree_norm(mu))
    expected = 0.1 * (1.0 if clip else 10.0 * np.sqrt(20.0))  # first moment = (1-b1) * grad
    assert mu_norm == pytest.approx(expected, rel=1e-5)


def test_optimizer_minimises_a_quadratic_under_jit():
    cfg = OptimConfig(lr=0.1, schedule="cosine", warmup_steps=2, weight_decay=0.0)
    params = {"x": {"kernel": jnp.full((2, 2), 3.0)}}
    tx = cfg.build(num_steps=60)
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["x"]["kernel"] ** 2)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(60):
        params, state = step(params, state)
    assert float(loss(params)) < 0.05 * 36.0


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"lr": -1.0}, "optim.lr=-1.0"),
        ({"schedule": "step"}, "optim.schedule='step'"),
        ({"warmup_steps": -3}, "optim.warmup_steps=-3"),
        ({"min_lr_ratio": 1.5}, "optim.min_lr_ratio=1.5"),
        ({"b2": 1.0}, "optim.b2=1.0"),
        ({"weight_decay": -0.1}, "optim.weight_decay=-0.1"),
        ({"grad_clip": -1.0}, "optim.grad_clip=-1.0"),
        ({"decay_fraction": 0.0}, "optim.decay_fraction=0.0"),
    ],
)
def test_invalid_config_raises_clear_error(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(".", r"\.")):
        OptimConfig(**kwargs)


def test_invalid_against_num_steps():
    with pytest.raises(ValueError, match=r"warmup_steps=50 .*num_steps=20"):
        OptimConfig(warmup_steps=50).schedule_fn(20)
    with pytest.raises(ValueError, match=r"decay_fraction=0\.9"):
        OptimConfig(schedule="wsd", warmup_steps=20, decay_fraction=0.9).schedule_fn(100)
    with pytest.raises(ValueError, match=r"num_steps=0"):
        OptimConfig().build(0)
    cfg = OptimConfig()
    cfg.lr = 0.0  # mutated after construction: build() re-validates
    with pytest.raises(ValueError, match=r"optim\.lr=0\.0"):
        cfg.build(10)

"""The coordinate check: how big each layer's activations are after a few Adam steps, as a function of width.

µP's correctness test (Yang et al. 2022, "Tensor Programs V"; the mup README's "coord check"): train models that differ
only in width for a few steps at one lr and measure every layer's typical activation entry. Under µP each layer's size
stays flat in width (every layer's update moves its features by Θ(1)); under SP the updates of the hidden and output
layers grow with width (Adam's step is Θ(lr) per entry whatever the width, and a trained layer sums d correlated
entries), so wider models move further at the same lr: the reason SP's best lr shifts with width.

Used by tests/test_mup.py (the contrast, asserted) and experiments/mup/coord_check.py (the plot).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scaling.model.decoder import ModelConfig, cross_entropy, init_params
from scaling.train.optim import OptimConfig


def _layer_name(path: tuple[str, ...]) -> str:
    """'embedding', 'block_0.attn', 'block_0.mlp', ..., 'logits' from a Flax module path."""
    if not path:
        return "logits"
    return "embedding" if path == ("wte",) else ".".join(path)


def _is_measured(module, method_name: str) -> bool:
    # The token embedding, each block's attention and MLP outputs (what they add to the residual stream), the logits.
    return method_name == "__call__" and (module.path in ((), ("wte",)) or module.name in ("attn", "mlp"))


def activation_rms(model: ModelConfig, tokens_BxLp1: jnp.ndarray, steps: int, lr: float, seed: int = 0
                   ) -> dict[str, list[float]]:
    """{layer: [RMS of its output entries at init, after 1 step, ..., after `steps` steps]} for one model trained on
    the one batch `tokens_BxLp1` by Adam at a constant `lr` (no warmup, clipping or decay: only the parametrization
    acts)."""
    optimizer = OptimConfig(lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip=None).build(
        steps, model)
    inputs_BxL, targets_BxL = tokens_BxLp1[:, :-1], tokens_BxLp1[:, 1:]

    def loss_and_rms(params) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        logits_BxLxV, state = model.build().apply({"params": params}, inputs_BxL, capture_intermediates=_is_measured)
        flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
        rms = {_layer_name(tuple(str(k.key) for k in path[:-2])): jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))
               for path, x in flat}
        return cross_entropy(logits_BxLxV, targets_BxL), rms

    def step(carry, _):
        params, opt_state = carry
        (_, rms), grads = jax.value_and_grad(loss_and_rms, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (jax.tree_util.tree_map(jnp.add, params, updates), opt_state), rms

    @jax.jit
    def run(params):
        # One compilation per model; step t measures the params after t updates (the last update is not used).
        return jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps + 1)[1]

    return {name: [float(x) for x in rms_T] for name, rms_T in run(init_params(model, jax.random.key(seed))).items()}


def coord_check(base: ModelConfig, widths: Sequence[int], tokens_BxLp1: jnp.ndarray, steps: int, lr: float
                ) -> dict[int, dict[str, list[float]]]:
    """`activation_rms` of `base` at each d_model in `widths` (d_ff = 4 d_model; heads as in `base`)."""
    return {d: activation_rms(base.replace(d_model=d), tokens_BxLp1, steps, lr) for d in widths}


def growth(table: dict[int, dict[str, list[float]]], step: int = -1) -> dict[str, float]:
    """Each layer's RMS at the widest width over its RMS at the narrowest, after `step` steps (default: the last)."""
    lo, hi = min(table), max(table)
    return {name: float(np.asarray(table[hi][name][step]) / np.asarray(table[lo][name][step])) for name in table[lo]}

"""The reference training steps `python -m scaling.bench` compares this project's step against.

Both build the same GPT-2 model as `scaling.model.decoder` at a given shape (learned positions, pre-LN, tanh GELU, tied head,
float32, N(0, 0.02) init with residual projections scaled by 1/sqrt(2 n_layers)) and the same optimizer (AdamW
b1 0.9, b2 0.95, decay 0.1 on matrices only, global-norm clipping at 1.0), and assert the same parameter count:

- `torch_step`: nanoGPT's model.py, written as nanoGPT writes it (`F.scaled_dot_product_attention(is_causal=True)`,
  `F.cross_entropy` over the logits of the tied head), eager or `torch.compile`d;
- `linen_step`: the plain Flax linen + optax step a new user would write (materialised causal scores and mask,
  optax's cross-entropy), i.e. this project's step without its CPU-specific work.

Each is timed by `scaling.bench.runner` in its own process: `make` returns a zero-argument `step()` that runs one training
step to completion and returns the loss.
"""

from __future__ import annotations

import math
from typing import Callable

LR, BETAS, WEIGHT_DECAY, EPS, CLIP, INIT_STD = 3e-3, (0.9, 0.95), 0.1, 1e-8, 1.0, 0.02


def torch_step(d_model: int, n_layers: int, n_heads: int, seq_len: int, vocab_size: int, batch: int,
               compile_model: bool, expected_params: int) -> Callable[[], float]:
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    torch.manual_seed(0)
    D, H, L, V = d_model, n_heads, seq_len, vocab_size

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = tnn.LayerNorm(D), tnn.LayerNorm(D)
            self.c_attn, self.attn_proj = tnn.Linear(D, 3 * D), tnn.Linear(D, D)
            self.c_fc, self.mlp_proj = tnn.Linear(D, 4 * D), tnn.Linear(4 * D, D)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
            q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
            x = x + self.attn_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = tnn.Embedding(V, D), tnn.Embedding(L, D)
            self.blocks = tnn.ModuleList(Block() for _ in range(n_layers))
            self.ln_f = tnn.LayerNorm(D)
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = INIT_STD / math.sqrt(2 * n_layers) if name.endswith("proj.weight") else INIT_STD
                    tnn.init.normal_(p, std=std)
                elif name.endswith("bias"):
                    tnn.init.zeros_(p)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
            return F.cross_entropy(logits.view(-1, V), targets.reshape(-1))

    model = GPT()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == expected_params, f"PyTorch reference has {n_params} params, the JAX model {expected_params}"
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not model.wte.weight]
    rest = [p for p in model.parameters() if p.dim() < 2 or p is model.wte.weight]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS)
    fwd = torch.compile(model) if compile_model else model
    # A new batch every step, as in training: on one repeated batch the model memorizes it, and past ~40 steps its
    # tiny gradients turn into denormals that torch (no flush-to-zero by default; XLA:CPU flushes) computes up to ~15%
    # slower (d384: 1,380 -> 1,600-1,650 ms per step by step 90; session 17).
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        tokens = torch.randint(0, V, (batch, L + 1), generator=gen)
        x, y = tokens[:, :-1], tokens[:, 1:]
        loss = fwd(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return float(loss.detach())

    return step


def linen_step(d_model: int, n_layers: int, n_heads: int, seq_len: int, vocab_size: int, batch: int,
               expected_params: int) -> Callable[[], float]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    D, H, L, V = d_model, n_heads, seq_len, vocab_size
    init = nn.initializers.normal(INIT_STD)
    resid_init = nn.initializers.normal(INIT_STD / math.sqrt(2 * n_layers))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            B = x.shape[0]
            q, k, v = jnp.split(nn.Dense(3 * D, kernel_init=init)(nn.LayerNorm(1e-5)(x)), 3, axis=-1)
            q, k, v = (t.reshape(B, L, H, D // H) for t in (q, k, v))
            att = jnp.einsum("blhk,bshk->bhls", q, k) / math.sqrt(D // H)
            att = jnp.where(jnp.tril(jnp.ones((L, L), bool)), att, jnp.finfo(jnp.float32).min)
            y = jnp.einsum("bhls,bshk->blhk", jax.nn.softmax(att, axis=-1), v).reshape(B, L, D)
            x = x + nn.Dense(D, kernel_init=resid_init)(y)
            h = nn.gelu(nn.Dense(4 * D, kernel_init=init)(nn.LayerNorm(1e-5)(x)), approximate=True)
            return x + nn.Dense(D, kernel_init=resid_init)(h)

    class GPT(nn.Module):
        @nn.compact
        def __call__(self, idx):
            wte = nn.Embed(V, D, embedding_init=init)
            x = wte(idx) + nn.Embed(L, D, embedding_init=init)(jnp.arange(L))[None]
            for _ in range(n_layers):
                x = Block()(x)
            return wte.attend(nn.LayerNorm(1e-5)(x))

    model = GPT()
    params = model.init(jax.random.key(0), jnp.zeros((1, L), jnp.int32))["params"]
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    assert n_params == expected_params, f"linen reference has {n_params} params, the JAX model {expected_params}"
    decay_mask = jax.tree_util.tree_map_with_path(lambda path, p: path[-1].key == "kernel", params)
    opt = optax.chain(optax.clip_by_global_norm(CLIP),
                      optax.adamw(LR, *BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, mask=decay_mask))
    tokens = jax.random.randint(jax.random.key(1), (batch, L + 1), 0, V)

    def loss_fn(params):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = [params, opt.init(params)]

    def step() -> float:
        state[0], state[1], loss = train_step(*state)
        return float(loss)  # float() waits for the step

    return step

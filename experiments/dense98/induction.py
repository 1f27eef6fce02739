"""Post hoc (session 19): is the steeper fall of the loss beyond ~3M tokens (long_ladder.py) the formation of
induction heads (Olsson et al. 2022, "In-context Learning and Induction Heads")? Their signature, measured on each
run's final parameters: the loss on a sequence repeated once. A model without induction heads cannot predict the
second copy better than the first; one with them copies it. Two kinds of sequence: uniformly random tokens (Olsson et
al.'s test; out of distribution for these small models) and 64-token windows of the validation text. Then the use
of context itself: on plain validation windows of L tokens, the mean loss at the first 16 positions against the last
16 (a model that reads no further back than a few tokens scores the same at both).

    python experiments/dense98/induction.py RUN_DIR [RUN_DIR ...]      # e.g. multirun/dense98_long/ladder-d72-*
"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scaling.data.tokens import load_tokens
from scaling.eval.sample import load_run

N_SEQ = 64  # sequences of random tokens
for run_dir in sys.argv[1:]:
    cfg, params = load_run(Path(run_dir))
    L, V = cfg.model.seq_len, cfg.model.vocab_size
    half = L // 2
    val = load_tokens(cfg.data).val
    starts = np.arange(N_SEQ) * (len(val) // N_SEQ)
    kinds = {"random": np.random.default_rng(0).integers(0, V, size=(N_SEQ, half)),
             "text": np.stack([val[s: s + half] for s in starts]).astype(np.int64)}
    line = []
    for kind, first_BxH in kinds.items():
        tokens_BxLp1 = np.concatenate([first_BxH, first_BxH, first_BxH[:, :1]], axis=1)[:, : L + 1]
        inputs_BxL = jnp.asarray(tokens_BxLp1[:, :-1], jnp.int32)
        logits_BxLxV = cfg.model.build().apply({"params": params}, inputs_BxL, deterministic=True)
        nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV.astype(jnp.float32),
                                                                 jnp.asarray(tokens_BxLp1[:, 1:], jnp.int32))
        nll_L = np.asarray(jax.device_get(nll_BxL)).mean(axis=0)
        first, second = nll_L[: half - 1].mean(), nll_L[half:].mean()  # position half-1 predicts the copy's start
        line.append(f"{kind}: first copy {first:.3f}, second {second:.3f}")
    windows_BxLp1 = np.stack([val[s: s + L + 1] for s in starts]).astype(np.int64)
    logits_BxLxV = cfg.model.build().apply({"params": params}, jnp.asarray(windows_BxLp1[:, :-1], jnp.int32),
                                           deterministic=True)
    nll_L = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), jnp.asarray(windows_BxLp1[:, 1:], jnp.int32))).mean(axis=0)
    line.append(f"context: positions 0-15 {nll_L[:16].mean():.3f}, {L - 16}-{L - 1} {nll_L[-16:].mean():.3f}")
    print(f"{Path(run_dir).name:30s} D {cfg.train.tokens or float('nan'):8.3g}  " + "   ".join(line))

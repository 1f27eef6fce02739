"""Does the best learning rate move with width? An lr sweep at two widths 4x apart, under SP and under µP.

    .venv/bin/python experiments/mup/lr_transfer.py                       # the table in experiments/mup/README.md

Each (parametrization, width) trains its models one after another from the same init and on the same batches, at
learning rates spaced 2x; only the lr differs. µP's base width is the narrow model, so there µP is SP but for the
attention scale, and the question is whether the wide model's best lr stays put (µP, Yang et al. 2022, "Tensor
Programs V", Fig. 1) or moves (SP). One compiled step per (parametrization, width): the optimizer is built at lr = 1 and
each model's lr is held in its state (scaling.train.stack.unit_lr_optimizer, equal to the plain optimizer up to
float rounding, tested), so the sweep pays 4 compilations, not one per lr. The best lr of each sweep is the grid's
and, when interior, the vertex of a parabola in ln(lr) through it and its neighbours (analysis.laws.lr.fit_lr_curve).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from analysis.laws.lr import fit_lr_curve
from scaling.data.tokenizers import TokenizerConfig
from scaling.data.tokens import DataConfig, load_tokens
from scaling.model.decoder import ModelConfig, init_params, loss_fn
from scaling.train.loop import make_train_step
from scaling.train.optim import OptimConfig
from scaling.train.stack import LrScaleState, unit_lr_optimizer


def final_losses(model: ModelConfig, optim: OptimConfig, lrs: list[float], data, steps: int, batch: int,
                 eval_tokens: int, seed: int = 0) -> list[float]:
    """Validation loss after `steps` steps at each lr (NaN if the run diverged to a non-finite loss)."""
    optimizer = unit_lr_optimizer(optim, steps, model)
    step = make_train_step(model, optimizer, 1, seed)
    evaluate = jax.jit(lambda params, batch_BxLp1: loss_fn(params, model, batch_BxLp1))
    val = list(data.val_batches(eval_tokens, batch, model.seq_len))
    out = []
    for lr in lrs:
        params = init_params(model, jax.random.key(seed))
        inner, _ = optimizer.init(params)
        state = {"params": params, "opt_state": (inner, LrScaleState(jnp.asarray(lr, jnp.float32)))}
        for s in range(steps):
            batch_1xBxLp1 = data.train_batch(seed, s, batch, model.seq_len)[None]
            state, _ = step(state, batch_1xBxLp1, jnp.asarray(s))
        loss = float(np.mean([float(evaluate(state["params"], b)) for b in val]))
        out.append(loss if np.isfinite(loss) else float("nan"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs=2, default=[32, 128], help="d_model of the narrow and the wide model")
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3 * 2**k for k in range(7)])
    p.add_argument("--eval-tokens", type=int, default=16384)
    args = p.parse_args()

    # The embedded English corpus, byte-level (vocab 257): real text with a head cheap enough for CPU sweeps.
    data = load_tokens(DataConfig(source="embedded", val_fraction=0.02, tokenizer=TokenizerConfig(kind="bytes")))
    optim = OptimConfig(warmup_fraction=0.05)  # the project's AdamW defaults: cosine, decay 0.1, clipping 1.0
    narrow, wide = args.widths
    results: dict[tuple[str, int], list[float]] = {}
    for parametrization in ("sp", "mup"):
        for d in (narrow, wide):
            model = ModelConfig(d_model=d, n_layers=args.layers, n_heads=d // args.head_dim, vocab_size=data.vocab_size,
                                seq_len=args.seq_len, parametrization=parametrization, mup_base_d_model=narrow)
            t0 = time.time()
            results[parametrization, d] = final_losses(model, optim, args.lrs, data, args.steps, args.batch,
                                                       args.eval_tokens)
            print(f"# {parametrization} d{d}: {len(args.lrs)} lrs in {time.time() - t0:.0f} s", flush=True)

    cols = list(results)
    print(f"\nfinal validation loss (nats/byte) after {args.steps} steps of {args.batch}x{args.seq_len} tokens, "
          f"{args.layers} layers, head dim {args.head_dim}, µP base width {narrow}\n")
    print("| lr | " + " | ".join(f"{par} d{d}" for par, d in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for i, lr in enumerate(args.lrs):
        print(f"| {lr:.4g} | " + " | ".join(f"{results[c][i]:.4f}" for c in cols) + " |")
    fits = {c: fit_lr_curve(args.lrs, results[c]) for c in cols}

    def best(c) -> float:
        return fits[c]["lr_opt"] or fits[c]["best_lr"]

    edge = {c: f" ({fits[c]['edge']} end)" if fits[c]["edge"] else "" for c in cols}
    print("| best lr (grid) | " + " | ".join(f"{fits[c]['best_lr']:.4g}{edge[c]}" for c in cols) + " |")
    print("| best lr (parabola) | " + " | ".join(f"{fits[c]['lr_opt']:.4g}" if fits[c]["lr_opt"] else "-"
                                                 for c in cols) + " |")
    for par in ("sp", "mup"):
        grid = fits[par, wide]["best_lr"] / fits[par, narrow]["best_lr"]
        fit = best((par, wide)) / best((par, narrow))
        print(f"{par}: best lr d{wide} / d{narrow} = {grid:.3g} on the grid, {fit:.3g} by the parabolas")


if __name__ == "__main__":
    main()

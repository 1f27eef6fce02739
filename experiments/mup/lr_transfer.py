"""Does the best learning rate move with width? An lr sweep at two widths 4x apart, under SP and under µP.

    .venv/bin/python experiments/mup/lr_transfer.py --seeds 0 1 --out experiments/mup    # README's last table

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
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from analysis.laws.lr import lr_sweeps
from analysis.report.plots import plot_lr_sweeps
from scaling.accounting import count_params
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
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3 * 2**k for k in range(1, 8)])
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--parametrizations", nargs="+", default=["sp", "mup"], choices=["sp", "mup"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="init and batch order; losses are averaged")
    p.add_argument("--tied", action="store_true",
                   help="tie the head to the embedding, as the first two tables did (ModelConfig refuses it under µP "
                        "since they were measured; bypassed here to reproduce them)")
    p.add_argument("--out", type=Path, default=None,
                   help="write lr_transfer.csv (one row per run) and the analysis lr view's figure per parametrization "
                        "(lr_transfer_<sp|mup>.png) here")
    args = p.parse_args()

    # The embedded English corpus, byte-level (vocab 257): real text with a head cheap enough for CPU sweeps.
    data = load_tokens(DataConfig(source="embedded", val_fraction=0.02, tokenizer=TokenizerConfig(kind="bytes")))
    optim = OptimConfig(warmup_fraction=0.05)  # the project's AdamW defaults: cosine, decay 0.1, clipping 1.0
    narrow, wide = args.widths
    rows = []
    for parametrization in args.parametrizations:
        for d in (narrow, wide):
            model = ModelConfig(d_model=d, n_layers=args.layers, n_heads=d // args.head_dim, vocab_size=data.vocab_size,
                                seq_len=args.seq_len, parametrization=parametrization, mup_base_d_model=narrow,
                                tie_embeddings=False)
            model.tie_embeddings = args.tied  # attribute assignment skips the validation
            n = count_params(model).non_embedding
            for seed in args.seeds:
                t0 = time.time()
                losses = final_losses(model, optim, args.lrs, data, args.steps, args.batch, args.eval_tokens, seed)
                print(f"# {parametrization} d{d} seed {seed}: {len(args.lrs)} lrs in {time.time() - t0:.0f} s",
                      flush=True)
                rows += [{"name": f"{parametrization}-d{d}-lr{lr:g}-s{seed}", "parametrization": parametrization,
                          "d_model": d, "seed": seed, "lr": lr, "loss": loss, "N": n,
                          "D": args.steps * args.batch * args.seq_len, "budget": np.nan,
                          "status": "completed" if np.isfinite(loss) else "diverged",
                          "excluded": not np.isfinite(loss), "reason": "" if np.isfinite(loss) else "non-finite loss"}
                         for lr, loss in zip(args.lrs, losses)]
    df = pd.DataFrame(rows)
    # The analysis package's lr view: per (N, D) group, the mean loss over seeds at each lr, the best grid lr and the
    # parabola's optimum (analysis.laws.lr.lr_sweeps).
    sweeps = {par: {s.N: s for s in lr_sweeps(df[df["parametrization"] == par])} for par in args.parametrizations}
    n_of = {d: int(df[df["d_model"] == d]["N"].iloc[0]) for d in (narrow, wide)}
    cols = [(par, d) for par in args.parametrizations for d in (narrow, wide)]
    print(f"\nfinal validation loss (nats/byte) after {args.steps} steps of {args.batch}x{args.seq_len} tokens, "
          f"{args.layers} layers, head dim {args.head_dim}, µP base width {narrow}, "
          f"{'tied' if args.tied else 'untied'} head, mean over seeds {args.seeds}\n")
    print("| lr | " + " | ".join(f"{par} d{d}" for par, d in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for i, lr in enumerate(args.lrs):
        print(f"| {lr:.4g} | " + " | ".join(f"{sweeps[par][n_of[d]].points['loss'].iloc[i]:.4f}" for par, d in cols)
              + " |")
    sweep = {c: sweeps[c[0]][n_of[c[1]]] for c in cols}
    edge = {c: f" ({sweep[c].edge} end)" if sweep[c].edge else "" for c in cols}
    print("| best lr (grid) | " + " | ".join(f"{sweep[c].best_lr:.4g}{edge[c]}" for c in cols) + " |")
    print("| best lr (parabola) | " + " | ".join(f"{sweep[c].lr_opt:.4g}" if sweep[c].lr_opt else "-" for c in cols)
          + " |")
    if len(args.seeds) > 1:
        spread = df.groupby(["parametrization", "d_model", "lr"])["loss"].std()
        print("| seed std (median over lrs) | " + " | ".join(f"{spread[c].median():.4f}" for c in cols) + " |")
    for par in args.parametrizations:
        lo, hi = sweep[par, narrow], sweep[par, wide]
        fit = (hi.lr_opt or hi.best_lr) / (lo.lr_opt or lo.best_lr)
        print(f"{par}: best lr d{wide} / d{narrow} = {hi.best_lr / lo.best_lr:.3g} on the grid, {fit:.3g} by the "
              "parabolas")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out / "lr_transfer.csv", index=False)
        for par in args.parametrizations:
            with tempfile.TemporaryDirectory() as tmp:
                for fig in plot_lr_sweeps(list(sweeps[par].values()), Path(tmp)):
                    shutil.copy(fig, args.out / f"lr_transfer_{par}{fig.suffix}")
        print(f"wrote {args.out / 'lr_transfer.csv'} and lr_transfer_<{'|'.join(args.parametrizations)}>.png")


if __name__ == "__main__":
    main()

"""µP, the maximal update parametrization (Yang et al. 2022, "Tensor Programs V", arXiv:2203.03466), as a model option.

`model.parametrization=mup` with `model.mup_base_d_model=b`: hyperparameters tuned on the base model (d_model = b)
transfer to wider ones. With the width multiplier m = d_model / b (every hidden width is taken to grow by m: d_ff with
d_model, as the sweep planner's ff_ratio keeps it; heads x head_dim = d_model always), each kind of parameter gets:

  parameter                                   init std             Adam lr       forward
  input: wte, wpe embeddings                  0.02                 lr            -
  hidden: every Dense kernel of the blocks    0.02 / sqrt(m)  (*)  lr / m        -
  biases, LayerNorm scales and biases         as SP                lr            -
  output: untied head kernel                  0.02                 lr            head input x (1/m)
  tied head (the wte matrix itself)           as input: 0.02       as input: lr  head input x (1/m)
  attention scores                            -                    -             q.k / K instead of q.k / sqrt(K)

  (*) the residual projections keep GPT-2's extra 1/sqrt(2 n_layers) (Radford et al. 2019, Section 2.3).

Why these: Table 3 of Yang et al. 2022 (µP for Adam) gives, as functions of width, input weights and all biases: init
variance and Adam lr constant; hidden weights: init variance ∝ 1/fan_in, Adam lr ∝ 1/fan_in; output weights: init
variance ∝ 1/fan_in^2, Adam lr ∝ 1/fan_in. The output column is used in its equivalent form with a multiplier 1/m in
the forward pass (Table 8; the mup package's MuReadout): the weight W keeps a width-independent init and Adam lr, and
W/m, what the logits see, has Table 3's init variance and lr. Attention scores use 1/K for the head dim K instead of
1/sqrt(K): once trained, q and k are correlated, so q.k grows like K (a law of large numbers), not like sqrt(K) (a
central limit) as at init (Yang et al. 2022, µP for Transformers; the mup README's "1/d instead of 1/sqrt(d)").
Every factor is anchored at the base: at d_model = b (m = 1) the model is the SP model except for the attention scale
(tested), so an SP-tuned base model is the starting point.

The tied embedding. Table 3 asks different things of an input and an output matrix, which one tied matrix cannot
satisfy; in the multiplier form both columns ask the same (a width-independent init and Adam lr), so the tied matrix
is treated as an input embedding for init and lr, and the 1/m output multiplier acts on the head's input. This is what
the mup package does for tied weights: MuSharedReadout is a MuReadout whose weight is the nn.Embedding's, whose shape
has one width dimension (vector-like), so MuAdam leaves its lr unchanged, and MuReadout.forward divides its input by
width_mult (mup/layer.py, mup/optim.py).

Where the weight decay goes: see `scaling.train.optim.OptimConfig.build` (the per-layer multiplier scales Adam's step
only; the decoupled decay stays lr_t * weight_decay per step at every width, as in mup's MuAdamW).

Under SP every function here is the identity (multiplier 1, scale None = each attention implementation's own
1/sqrt(K)), so SP results are bit-identical to the code before this option. The functions take a ModelConfig (not
imported here: scaling.model.decoder imports this module).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax

PARAMETRIZATIONS = ("sp", "mup")


def width_multiplier(cfg: Any) -> float:
    """m = d_model / mup_base_d_model under µP; 1 under SP."""
    return cfg.d_model / cfg.mup_base_d_model if cfg.parametrization == "mup" else 1.0


def hidden_init_multiplier(cfg: Any) -> float:
    """Hidden kernels' init std x 1/sqrt(m): variance ∝ 1/fan_in (Yang et al. 2022, Table 3), = GPT-2's at the base."""
    return 1.0 / math.sqrt(width_multiplier(cfg))


def attention_scale(cfg: Any) -> Optional[float]:
    """The scores' scale: 1/K under µP; None under SP, which leaves each implementation its own 1/sqrt(K)."""
    return 1.0 / cfg.head_dim if cfg.parametrization == "mup" else None


def output_multiplier(cfg: Any) -> Optional[float]:
    """The head input's multiplier b / d_model = 1/m under µP (Yang et al. 2022, Table 8); None under SP."""
    return 1.0 / width_multiplier(cfg) if cfg.parametrization == "mup" else None


def _names(path: tuple[Any, ...]) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def lr_multipliers(cfg: Any, tree: Any) -> Any:
    """Floats shaped like `tree` (the params, or their gradients or updates): each leaf's Adam lr multiplier, 1/m for
    the hidden kernels (every "kernel" but the untied head's), 1 for embeddings, biases, norms and the head."""

    def rule(path: tuple[Any, ...], leaf: Any) -> float:
        names = _names(path)
        hidden = names[-1] == "kernel" and "head" not in names
        return 1.0 / width_multiplier(cfg) if hidden else 1.0

    return jax.tree_util.tree_map_with_path(rule, tree)

"""µP, the maximal update parametrization (Yang et al. 2022, "Tensor Programs V", arXiv:2203.03466), as a model option.

`model.parametrization=mup` with `model.mup_base_d_model=b`: hyperparameters tuned on the base model (d_model = b)
transfer to wider ones. With the width multiplier m = d_model / b (every hidden width is taken to grow by m: d_ff with
d_model, as the sweep planner's ff_ratio keeps it; heads x head_dim = d_model always), each kind of parameter gets:

  parameter                                   init std             Adam lr       forward
  input: wte, wpe embeddings                  0.02                 lr            -
  hidden: every Dense kernel of the blocks    0.02 / sqrt(m)  (*)  lr / m        -
  biases, LayerNorm scales and biases         as SP                lr            -
  output: the head kernel (untied)            0.02                 lr            head input x (1/m)
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

The head must be untied (ModelConfig refuses µP with model.tie_embeddings=true). The mup package allows a tied head
(MuSharedReadout: the nn.Embedding's weight, treated as an input weight, with the 1/m multiplier on the readout's
input), and this module did the same until it was measured on this CPU (experiments/mup/README.md, 2 layers, byte
vocabulary, 1,200 steps): tied, µP's best lr moved 8x between widths 32 and 128 and the wide model was worse than the
narrow one at the same lr; untied, with nothing else changed, the best lr was the same at both widths (0.016) and the
wide model better at every lr. In a 200-step coordinate check on one text batch (experiments/mup/tied_check.py) the
tied model's block outputs after 100 and 200 steps grew 1.6-5.7x from width 32 to 512, the untied model's did not
(0.3-1.2x). One matrix is both an input weight, whose features should move by Θ(1), and, through the readout, an
output weight, whose effect on the logits shrinks as 1/m, under one Adam normaliser: why exactly that breaks the
width-independence here is not established; that it does is.

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
    the hidden kernels (every "kernel" but the head's), 1 for embeddings, biases, norms and the head."""

    def rule(path: tuple[Any, ...], leaf: Any) -> float:
        names = _names(path)
        hidden = names[-1] == "kernel" and "head" not in names
        return 1.0 / width_multiplier(cfg) if hidden else 1.0

    return jax.tree_util.tree_map_with_path(rule, tree)

"""Why µP needs an untied head here: a longer coordinate check, tied against untied, on real text.

    .venv/bin/python experiments/mup/tied_check.py        # about 3 minutes on 2 cores

µP models of width 32, 128 and 512 (2 layers, head dim 16, base width 32, byte vocabulary) trained for 200 Adam steps
at a constant lr 0.016 (the best lr of both untied widths in the lr sweep) on one batch of 16 x 64 bytes of the
embedded corpus; each layer's output RMS at steps 0, 20, 100 and 200 (scaling.model.coord_check.activation_rms). Under
µP a layer's size should not depend on width. The tied model is built by bypassing ModelConfig's check (which refuses
µP with a tied head because of what this measures).
"""

from __future__ import annotations

from scaling.data.tokenizers import TokenizerConfig
from scaling.data.tokens import DataConfig, load_tokens
from scaling.model.coord_check import activation_rms
from scaling.model.decoder import ModelConfig

WIDTHS, STEPS, LR, AT = (32, 128, 512), 200, 0.016, (0, 20, 100, 200)


def main() -> None:
    data = load_tokens(DataConfig(source="embedded", val_fraction=0.02, tokenizer=TokenizerConfig(kind="bytes")))
    tokens_BxLp1 = data.train_batch(0, 0, 16, 64)
    for tie in (True, False):
        tables = {}
        for d in WIDTHS:
            model = ModelConfig(d_model=d, n_layers=2, n_heads=d // 16, vocab_size=data.vocab_size, seq_len=64,
                                parametrization="mup", mup_base_d_model=WIDTHS[0], tie_embeddings=False)
            model.tie_embeddings = tie  # attribute assignment skips __post_init__'s validation
            tables[d] = activation_rms(model, tokens_BxLp1, STEPS, LR)
        print(f"\n{'tied' if tie else 'untied'} head: output RMS at steps {AT}")
        print("| layer | " + " | ".join(f"d{d}" for d in WIDTHS) + f" | d{WIDTHS[-1]} / d{WIDTHS[0]} |")
        print("|---|" + "---|" * (len(WIDTHS) + 1))
        for name in tables[WIDTHS[0]]:
            cells = [" ".join(f"{tables[d][name][t]:.3g}" for t in AT) for d in WIDTHS]
            ratio = " ".join(f"{tables[WIDTHS[-1]][name][t] / tables[WIDTHS[0]][name][t]:.2g}" for t in AT)
            print(f"| {name} | " + " | ".join(cells) + f" | {ratio} |", flush=True)


if __name__ == "__main__":
    main()

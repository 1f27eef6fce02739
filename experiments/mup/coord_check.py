"""The coordinate check plot (Yang et al. 2022, "Tensor Programs V"; the mup README's "coord check"): each layer's
activation RMS against width, at init and after each of a few Adam steps, under SP and under µP.

    .venv/bin/python experiments/mup/coord_check.py      # -> experiments/mup/coord_check.png (about a minute)

The model and steps are tests/test_mup.py's coordinate check (which asserts the contrast): depth 2, widths 32..512 with
4 heads (head dim 8..128), µP base width 32, 4 steps of Adam at lr 1e-2 on one batch of random tokens, here with the
default (CPU) attention and head-loss kernels.
"""

from pathlib import Path

import jax
import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scaling.model.coord_check import coord_check, growth  # noqa: E402
from scaling.model.decoder import ModelConfig  # noqa: E402

WIDTHS = [32, 64, 128, 256, 512]
STEPS, LR = 4, 1e-2
OUT = Path(__file__).with_name("coord_check.png")


def main() -> None:
    tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, 256)
    base = ModelConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=256, seq_len=16, parametrization="mup",
                       mup_base_d_model=32, tie_embeddings=False)
    tables = {p: coord_check(base.replace(parametrization=p), WIDTHS, tokens, STEPS, LR) for p in ("sp", "mup")}
    layers = list(tables["mup"][WIDTHS[0]])
    fig, axes = plt.subplots(2, len(layers), figsize=(3.0 * len(layers), 6.0), sharex=True, sharey=True)
    colors = plt.cm.viridis([t / STEPS for t in range(STEPS + 1)])
    for row, (par, table) in enumerate(tables.items()):
        for col, name in enumerate(layers):
            ax = axes[row, col]
            for t in range(STEPS + 1):
                ax.plot(WIDTHS, [table[d][name][t] for d in WIDTHS], "o-", ms=3, color=colors[t], label=f"t={t}")
            ax.set(xscale="log", yscale="log", title=f"{'µP' if par == 'mup' else 'SP'}: {name}")
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xticks(WIDTHS, [str(d) for d in WIDTHS])
            if row == 1:
                ax.set_xlabel("d_model")
            if col == 0:
                ax.set_ylabel("activation RMS")
        print(f"{par}: RMS(d{WIDTHS[-1]}) / RMS(d{WIDTHS[0]}) after {STEPS} steps: "
              + ", ".join(f"{k} {v:.3g}" for k, v in growth(table).items()))
    print(f"\nRMS of each layer's output after step {STEPS}:")
    print("| layer | " + " | ".join(f"{'µP' if par == 'mup' else 'SP'} d{d}" for par in tables for d in WIDTHS) + " |")
    print("|---|" + "---|" * (len(tables) * len(WIDTHS)))
    for name in layers:
        print(f"| {name} | " + " | ".join(f"{tables[par][d][name][-1]:.3g}" for par in tables for d in WIDTHS) + " |")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(f"coordinate check: depth 2, {STEPS} Adam steps at lr {LR:g} (t = steps taken), µP base width 32")
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

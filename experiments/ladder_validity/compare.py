"""Ladder validity: the final loss of each cooldown branch against the ordinary cosine run to the same D.

    python experiments/ladder_validity/compare.py multirun/ladder_validity_cosine multirun/ladder_validity
    python experiments/ladder_validity/compare.py COS_S0 LAD_S0 COS_S1 LAD_S1 long   # seeds -> gap_long.md, gap_long.png
    python experiments/ladder_validity/compare.py experiments/ladder_validity/long/cos_s0 \
        experiments/ladder_validity/long_1sqrt/lad_s0 experiments/ladder_validity/long/cos_s1 \
        experiments/ladder_validity/long_1sqrt/lad_s1 long_1sqrt             # the committed 1-sqrt branches (session 21)

Reads each sweep's runs.csv (`python -m scaling.sweep collect` writes it; collected here when missing), matches points
by shape (d_model, n_layers) and D, and writes gap.md (the table) and gap.png (loss against D per shape) beside this
script (gap_<suffix>.* when the argument count is odd: the last one is the suffix). Each (cosine, ladder) pair of
sweeps is one seed; with several, the table gives the seed-mean losses, the gap of the means and each seed's gap.
gap = branch / cosine - 1: Hägele et al. 2024 (Fig. 3-4) find a 20% cooldown within about 0.5% of cosine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

OUT = Path(__file__).resolve().parent
KEY = ["d_model", "n_layers", "D"]


def runs(sweep: Path) -> pd.DataFrame:
    csv = sweep / "runs.csv"
    if not csv.exists():
        from scaling.sweep.schedule import collect, write_csv

        write_csv(collect(sweep), csv)
    df = pd.read_csv(csv)
    bad = df[df["status"] != "completed"]
    if len(bad):
        raise SystemExit(f"{sweep}: {len(bad)} runs are not completed ({', '.join(bad['name'])}): relaunch the sweep")
    return df


def pair(cosine_dir: str, ladder_dir: str) -> tuple[pd.DataFrame, float, float]:
    """One seed's points (cosine and branch loss per shape and D) and the FLOPs each half spent."""
    cosine, ladder = runs(Path(cosine_dir)), runs(Path(ladder_dir))
    branches = ladder[ladder["role"] == "branch"]
    both = cosine[KEY + ["N", "loss", "C"]].merge(branches[KEY + ["loss", "C_spent"]], on=KEY, suffixes=("_cosine", "_branch"))
    if len(both) != len(cosine):
        raise SystemExit(f"only {len(both)} of the {len(cosine)} cosine points have a branch at the same shape and D")
    both["gap"] = both["loss_branch"] / both["loss_cosine"] - 1
    return both.sort_values(KEY, ignore_index=True), cosine["C"].sum(), ladder["C_spent"].sum()


def main(dirs: list[str], suffix: str = "") -> pd.DataFrame:
    stem = f"gap_{suffix}" if suffix else "gap"
    seeds = [pair(c, lad) for c, lad in zip(dirs[::2], dirs[1::2])]
    spent_cosine, spent_ladder = sum(s[1] for s in seeds), sum(s[2] for s in seeds)
    if len(seeds) == 1:
        both = seeds[0][0]
        lines = ["| shape | N | D | cosine loss | branch loss | gap |", "|---|---|---|---|---|---|"]
        lines += [f"| d{r.d_model}-L{r.n_layers} | {r.N:.3g} | {r.D:.3g} | {r.loss_cosine:.4f} | {r.loss_branch:.4f} | "
                  f"{r.gap:+.2%} |" for r in both.itertuples()]
    else:
        tables = [s[0].set_index(KEY) for s in seeds]
        if any(len(t) != len(tables[0]) or not t.index.equals(tables[0].index) for t in tables):
            raise SystemExit("the seeds' sweeps do not hold the same shapes and D")
        both = tables[0][["N"]].copy()
        for col in ("loss_cosine", "loss_branch"):
            both[col] = sum(t[col] for t in tables) / len(tables)
        both["gap"] = both["loss_branch"] / both["loss_cosine"] - 1
        both = both.reset_index()
        per_seed = [t["gap"].to_numpy() for t in tables]
        head = " | ".join(f"gap seed {i}" for i in range(len(tables)))
        lines = [f"| shape | N | D | cosine loss (mean) | branch loss (mean) | gap of the means | {head} |",
                 "|---|---|---|---|---|---|" + "---|" * len(tables)]
        lines += [f"| d{r.d_model}-L{r.n_layers} | {r.N:.3g} | {r.D:.3g} | {r.loss_cosine:.4f} | {r.loss_branch:.4f} | "
                  f"{r.gap:+.2%} | " + " | ".join(f"{g[i]:+.2%}" for g in per_seed) + " |"
                  for i, r in enumerate(both.itertuples())]
    lines += ["", f"Mean gap {both['gap'].mean():+.2%}, largest |gap| {both['gap'].abs().max():.2%} over {len(both)} "
              f"points{f' (seed means of {len(seeds)} seeds)' if len(seeds) > 1 else ''}. FLOPs spent (chinchilla): "
              f"cosine runs {spent_cosine:.3g}, ladders {spent_ladder:.3g} ({spent_ladder / spent_cosine:.2f}x)."]
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, ax = plt.subplots(figsize=(6, 4))
    for (d, L), g in both.groupby(["d_model", "n_layers"]):
        line, = ax.plot(g["D"], g["loss_cosine"], "o-", label=f"d{d}-L{L} cosine")
        ax.plot(g["D"], g["loss_branch"], "s--", color=line.get_color(), mfc="none", label=f"d{d}-L{L} ladder branch")
    ax.set_xscale("log")
    ax.set_xlabel("D (tokens)")
    ax.set_ylabel("final validation loss (nats/token)" + (f", mean of {len(seeds)} seeds" if len(seeds) > 1 else ""))
    ax.set_title("Cooldown branches (20%) vs cosine runs to the same D" + (f"\n[{suffix}]" if suffix else ""), fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / f"{stem}.png", dpi=120)
    return both


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) < 2:
        raise SystemExit(__doc__)
    main(args[:-1], args[-1]) if len(args) % 2 else main(args)

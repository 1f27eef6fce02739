"""Does the best fitting choice of one setting stay best in the others? Each setting's winner and Hoffmann's baseline,
scored in all four settings (N with / without embeddings x target 1b at r = 10, 14, 20 / target 400m at r = 10).

  python experiments/extrapolation/crosscheck.py ../shared/published/misfitting2025_scaling_results.csv
writes experiments/extrapolation/crosscheck.md (the winners are read from the four folders `analysis extrapolation`
wrote beside this script, so run those first; the README gives the commands).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from analysis.checks.extrapolation import ONE_AT_A_TIME, FitChoice, combine, compare_choices, load_testbed

HERE = Path(__file__).parent
# folder -> (n_column, ratios, max_size): the settings the README's commands ran.
SETTINGS = {"nonembedding": ("N_no_emb", (10.0, 14.0, 20.0), None), "total": ("N", (10.0, 14.0, 20.0), None),
            "nonembedding_400m": ("N_no_emb", (10.0,), 4e8), "total_400m": ("N", (10.0,), 4e8)}


def choice_named(name: str) -> FitChoice:
    """The FitChoice whose .name is `name`: a single change or a combination of them."""
    singles = {c.name: c for c in ONE_AT_A_TIME}
    if name in singles:
        return singles[name]
    method, *parts = name.split(" ")
    ref = FitChoice(method=method)
    out = combine([c for c in ONE_AT_A_TIME if c.method == method and c.name.split(" ", 1)[-1] in parts], ref)
    if out.name != name:
        raise ValueError(f"choice {name!r}: not a combination of the one-at-a-time changes (rebuilt {out.name!r})")
    return out


def main(csv: str) -> None:
    winners = {folder: json.loads((HERE / folder / "extrapolation.json").read_text())["best"] for folder in SETTINGS}
    choices = list(dict.fromkeys([FitChoice()] + [choice_named(w) for w in winners.values()]))
    rows = {c.name: {} for c in choices}
    for folder, (n_column, ratios, max_size) in SETTINGS.items():
        cmp = compare_choices(load_testbed(csv, n_column=n_column), choices, ratios, max_size=max_size,
                              combinations=False)
        for r in cmp["rows"]:
            rows[r["choice"]][folder] = r.get("mean_abs_rel_error")
    head = ["choice (best in)"] + list(SETTINGS) + ["mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, errs in rows.items():
        best_in = [f for f, w in winners.items() if w == name]
        vals = [errs[f] for f in SETTINGS]
        lines.append(f"| {name}{' (' + ', '.join(best_in) + ')' if best_in else ''} | "
                     + " | ".join(f"{v:.2%}" if v is not None else "not fitted" for v in vals)
                     + f" | {sum(vals) / len(vals):.2%} |")
    text = "\n".join(["# Cross-check: each setting's best choice in every setting", "",
                      "Mean |L_pred - L_true| / L_true over the held-out final checkpoints (1b: r = 10, 14, 20; 400m: "
                      "r = 10).", "", *lines, ""])
    (HERE / "crosscheck.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/published/misfitting2025_scaling_results.csv")

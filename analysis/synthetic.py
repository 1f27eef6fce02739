"""Synthetic runs from a known L(N, D) (Hoffmann et al. 2022 eq. 2) for recovery tests, the benchmark and demos.

Chinchilla's published fit is the default truth: E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

CHINCHILLA_TRUTH = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022 eq. 10


def chinchilla_loss(N, D, E, A, B, alpha, beta):
    return E + A / np.asarray(N, float) ** alpha + B / np.asarray(D, float) ** beta


def isoflop_runs(budgets=(1e17, 3e17, 1e18, 3e18, 1e19), n_per_budget: int = 9, noise: float = 0.01,
                 seed: int = 0, truth: dict | None = None, span: float = 1.2) -> pd.DataFrame:
    """An IsoFLOP grid: per budget C, `n_per_budget` sizes log-spaced spanning `span` decades around the true
    N_opt(C), D = C / (6 N), loss = L(N, D) * exp(noise * z) (multiplicative noise, z ~ N(0, 1))."""
    t = truth or CHINCHILLA_TRUTH
    rng = np.random.default_rng(seed)
    G = (t["alpha"] * t["A"] / (t["beta"] * t["B"])) ** (1 / (t["alpha"] + t["beta"]))
    a = t["beta"] / (t["alpha"] + t["beta"])
    rows = []
    for C in budgets:
        n_opt = G * (C / 6) ** a
        for N in n_opt * np.logspace(-span / 2, span / 2, n_per_budget):
            D = C / (6 * N)
            loss = chinchilla_loss(N, D, **t) * np.exp(noise * rng.standard_normal())
            rows.append({"name": f"isoflop-{C:.0e}-N{N:.3g}", "N": N, "D": D, "C": C, "budget": C, "loss": loss})
    df = pd.DataFrame(rows)
    df["status"], df["excluded"], df["reason"] = "completed", False, ""
    df["flops_per_token"], df["N_convention"], df["C_convention"] = 6.0, "synthetic", "6ND"
    return df


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_sweep(root: str | Path, runs: pd.DataFrame, *, n_steps: int = 20, seq_len: int = 128,
                failed: int = 1, diverged: int = 1, sweep: str = "synthetic") -> Path:
    """Write `runs` as run directories (record.json + metrics.jsonl, the run-record contract) under `root`, plus
    `failed` failed and `diverged` diverged runs and a sweep.json manifest. Curves follow L(N, D(t)) of the truth
    with a loss that decays to the run's final value."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    planned = []
    extra = [("failed", i) for i in range(failed)] + [("diverged", i) for i in range(diverged)]
    all_runs = [(r, "completed") for r in runs.to_dict("records")] + [
        (dict(runs.iloc[i % len(runs)]) | {"name": f"{kind}-{i}"}, kind) for kind, i in extra]
    for r, status in all_runs:
        run_dir = root / f"C{r['budget']:.0e}" / r["name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        N, D, C = float(r["N"]), float(r["D"]), float(r["C"])
        steps = np.linspace(1, n_steps, n_steps)
        frac = steps / n_steps
        # Loss along training: a D-limited curve ending at the run's final loss (shape only matters for plots).
        curve = r["loss"] + 0.5 * (frac ** -0.3 - 1)
        with open(run_dir / "metrics.jsonl", "w") as fh:
            for s, f, l in zip(steps, frac, curve):
                line = {"step": int(s), "tokens": f * D, "flops": f * C, "lr": 1e-3, "train_loss": float(l),
                        "grad_norm": 1.0, "tokens_per_s": 1e5, "mfu": 0.3}
                if int(s) % 5 == 0:
                    line["eval_loss"] = float(l + 0.01)
                fh.write(json.dumps(line) + "\n")
        rec = {
            "name": r["name"], "status": status,
            "error": "RuntimeError: out of memory" if status == "failed" else None,
            "diverged_step": 7 if status == "diverged" else None,
            "N": N, "N_total": N * 1.1, "N_embedding": N * 0.1, "tied_embeddings": False,
            "D": D, "steps": n_steps, "batch_size": 8, "seq_len": seq_len, "tokens_per_step": D / n_steps,
            "C": C, "C_convention": "6N", "C_6N": C, "C_kaplan": C * 1.05, "C_chinchilla": C * 1.1,
            "flops_per_token": {"6N": 6 * N, "kaplan": 6.3 * N, "chinchilla": 6.6 * N},
            "budget": {"kind": "flops", "value": float(r["budget"]), "convention": "6N"}, "sweep": sweep,
            "loss": None if status != "completed" else float(r["loss"]),
            "train_loss": float(curve[-1]), "epochs": 0.5, "seed": 0,
            "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256, "vocab_size": 512, "seq_len": seq_len,
                      "pos_encoding": "rope"},
            "optim": {"lr": 1e-3, "schedule": "cosine", "warmup": 10, "weight_decay": 0.1},
        }
        _write_json(run_dir / "record.json", rec)
        planned.append({"name": r["name"], "budget": float(r["budget"])})
    planned.append({"name": "never-ran", "budget": float(runs["budget"].iloc[0])})
    _write_json(root / "sweep.json", {"name": sweep, "planned": planned, "rule": {"kind": "isoflop"},
                                      "git_commit": "0" * 40})
    return root

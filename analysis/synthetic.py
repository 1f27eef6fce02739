"""Synthetic runs from a known L(N, D) (Hoffmann et al. 2022 eq. 2) for recovery tests, the benchmark and demos.

Chinchilla's published fit is the default truth: E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from scaling.accounting import FLOPS_PER_PARAM_TOKEN as K6
from scaling.record import write_manifest, write_record

CHINCHILLA_TRUTH = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022 eq. 10


def chinchilla_loss(N, D, E, A, B, alpha, beta):
    return E + A / np.asarray(N, float) ** alpha + B / np.asarray(D, float) ** beta


def isoflop_runs(budgets=(1e17, 3e17, 1e18, 3e18, 1e19), n_per_budget: int = 9, noise: float = 0.01,
                 seed: int = 0, truth: dict | None = None, span: float = 1.2) -> pd.DataFrame:
    """An IsoFLOP grid: per budget C, `n_per_budget` sizes log-spaced spanning `span` decades around the true
    N_opt(C), D = C / (6 N), loss = L(N, D) * exp(noise * z) (multiplicative noise, z ~ N(0, 1)): C = 6ND."""
    t = truth or CHINCHILLA_TRUTH
    rng = np.random.default_rng(seed)
    G = (t["alpha"] * t["A"] / (t["beta"] * t["B"])) ** (1 / (t["alpha"] + t["beta"]))
    a = t["beta"] / (t["alpha"] + t["beta"])
    rows = []
    for C in budgets:
        n_opt = G * (C / K6) ** a
        for N in n_opt * np.logspace(-span / 2, span / 2, n_per_budget):
            D = C / (K6 * N)
            loss = chinchilla_loss(N, D, **t) * np.exp(noise * rng.standard_normal())
            rows.append({"name": f"isoflop-{C:.0e}-N{N:.3g}", "N": N, "D": D, "C": C, "budget": C, "loss": loss})
    df = pd.DataFrame(rows)
    df["status"], df["excluded"], df["reason"] = "completed", False, ""
    df["flops_per_token"], df["N_convention"], df["C_convention"] = K6, "synthetic", "6ND"
    return df


def seed_replicates(points: pd.DataFrame, seeds=(0, 1, 2), sigma=0.01, seed: int = 0) -> pd.DataFrame:
    """Seed replicates of noise-free points (e.g. `isoflop_runs(noise=0)`): one run per point and seed, named
    `<name>-s<seed>`, with loss = L * exp(sigma_p z), z ~ N(0, 1). `sigma` is one relative noise for every point or
    one per point (the seed noise analysis.checks.seeds estimates)."""
    rng = np.random.default_rng(seed)
    sig = np.broadcast_to(np.asarray(sigma, float), (len(points),))
    rows = []
    for (_, p), s_p in zip(points.iterrows(), sig):
        for s in seeds:
            rows.append(p.to_dict() | {"name": f"{p['name']}-s{s}", "seed": int(s),
                                       "loss": float(p["loss"] * np.exp(s_p * rng.standard_normal()))})
    return pd.DataFrame(rows)


# The real record's model and optim objects (scaling.model.decoder.ModelConfig, scaling.train.optim.OptimConfig defaults, written out
# because analysis never imports the model; tests/test_record.py checks they still match the dataclasses).
MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": None, "vocab_size": 512, "seq_len": 128,
         "pos_encoding": "learned", "tie_embeddings": True, "use_bias": True, "dropout": 0.0, "param_dtype": "float32",
         "compute_dtype": "float32", "remat": "none", "scan_layers": False, "attention": "auto", "attention_block": 64,
         "head_loss": "auto", "rope_base": 10000.0, "parametrization": "sp", "mup_base_d_model": None}
OPTIM = {"lr": 1e-3, "schedule": "cosine", "warmup_steps": None, "warmup_fraction": 0.02, "min_lr_ratio": 0.1,
         "decay_fraction": 0.2, "decay_shape": "linear", "b1": 0.9, "b2": 0.95, "eps": 1e-08, "weight_decay": 0.1, "decay_embeddings": False,
         "decay_norms_and_biases": False, "grad_clip": 1.0}
# C per FLOP convention relative to 6N, for fixtures (the real ratios depend on the shape; these only need to differ).
FIXTURE_RATIOS = {"6N": 1.0, "kaplan": 1.05, "chinchilla": 1.1}


def write_sweep(root: str | Path, runs: pd.DataFrame, *, n_steps: int = 20, seq_len: int = 128,
                failed: int = 1, diverged: int = 1, sweep: str = "synthetic", convention: str = "6N") -> Path:
    """Write `runs` as run directories (record.json through scaling.record.write_record + metrics.jsonl) under `root`,
    plus `failed` failed and `diverged` diverged runs and a sweep.json manifest. The runs' C and budgets are in
    `convention` (the one the sweep was planned in); the records' other conventions scale C by FIXTURE_RATIOS.
    Curves follow L(N, D(t)) of the truth with a loss that decays to the run's final value."""
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
        # C per convention: the runs' own columns when given (C_6N, ...), else FIXTURE_RATIOS; C under `convention`.
        C_by = {c: float(r[f"C_{c}"]) if f"C_{c}" in r else C * FIXTURE_RATIOS[c] / FIXTURE_RATIOS[convention]
                for c in FIXTURE_RATIOS}
        C_by[convention] = C  # exact
        write_record(run_dir, {
            "name": r["name"], "status": status,
            "error": "RuntimeError: out of memory" if status == "failed" else None,
            "diverged_step": 7 if status == "diverged" else None,
            "N": N, "N_total": N * 1.1, "N_embedding": N * 0.1, "N_head": 0, "tied_embeddings": True,
            "steps": n_steps, "tokens_per_step": D / n_steps, "D": D,
            **{f"C_{c}": v for c, v in C_by.items()}, "batch_size": 8, "seq_len": seq_len,
            "C": C, "C_convention": convention, "flops_per_token": {c: v / D for c, v in C_by.items()},
            "budget": {"kind": "flops", "value": float(r["budget"]), "convention": convention}, "sweep": sweep,
            "model": MODEL | {"seq_len": seq_len}, "optim": OPTIM, "seed": int(r.get("seed", 0)),
            "loss": None if status != "completed" else float(r["loss"]),
            "train_loss": float(curve[-1]), "epochs": 0.5,
            **(eval_record(r) if status == "completed" else {}),  # eval_<task>_* columns -> the record's `eval`
        })
        planned.append({"name": r["name"], "budget": float(r["budget"])})
    planned.append({"name": "never-ran", "budget": float(runs["budget"].iloc[0])})
    write_manifest(root, {"name": sweep, "kind": "isoflop", "convention": convention,
                          "budgets": sorted({float(b) for b in runs["budget"]}), "planned": planned,
                          "rule": {"kind": "isoflop"}, "git_commit": "0" * 40})
    return root


# --------------------------------------------------------------------------------------------------------------------
# Evaluated runs (analysis.laws.downstream): task accuracy a known sigmoid of the loss, in the run table's eval_*
# columns
# --------------------------------------------------------------------------------------------------------------------
# A loss law whose tiny models (N 1e5-1e7, D 5-80 tokens per parameter) span ~2.3-4.5 nats, where a task can emerge.
TINY_TRUTH = {"E": 2.0, "A": 60.0, "B": 300.0, "alpha": 0.4, "beta": 0.35}
# acc(L) of analysis.laws.downstream.AccuracyFit on the validation loss: 4-way multiple choice rising to 90%.
SIGMOID_TRUTH = {"floor": 0.25, "ceiling": 0.9, "k": 3.0, "L0": 3.2}
TASK_LOSS = (1.2, 0.3)  # task loss = 1.2 L + 0.3 (the correct answer's -log-likelihood follows the loss affinely)


def downstream_runs(sizes=(1e5, 3e5, 1e6, 3e6, 1e7), tokens_per_param=(5, 20, 80), tasks: dict | None = None,
                    truth: dict | None = None, acc_noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Runs N x D (D = r N for each r), C = 6ND, loss = L(N, D) of `truth`, and per task (name -> sigmoid truth, default
    {"cloze": SIGMOID_TRUTH}) eval_<task>_acc = acc(loss) + acc_noise z (clipped to [0, 1]), _acc_norm = _acc,
    _logprob = -(TASK_LOSS[0] loss + TASK_LOSS[1]), _chance = the floor. In the columns analysis.load gives a table."""
    from analysis.laws.downstream import AccuracyFit  # downstream imports the fits; keep this module's imports light

    t, tasks = truth or TINY_TRUTH, tasks or {"cloze": SIGMOID_TRUTH}
    rng = np.random.default_rng(seed)
    rows = []
    for N in sizes:
        for r in tokens_per_param:
            D = r * N
            loss = float(chinchilla_loss(N, D, **t))
            row = {"name": f"N{N:.3g}-D{D:.3g}", "N": N, "D": D, "C": K6 * N * D, "budget": K6 * N * D,
                   "loss": loss}
            for task, s in tasks.items():
                acc = AccuracyFit(**s, n_points=0, rmse=0.0, ceiling_fixed=False)(loss)
                acc = float(np.clip(acc + acc_noise * rng.standard_normal(), 0, 1))
                row.update({f"eval_{task}_acc": acc, f"eval_{task}_acc_norm": acc,
                            f"eval_{task}_logprob": -(TASK_LOSS[0] * loss + TASK_LOSS[1]),
                            f"eval_{task}_chance": s["floor"]})
            rows.append(row)
    df = pd.DataFrame(rows)
    df["status"], df["excluded"], df["reason"] = "completed", False, ""
    df["flops_per_token"], df["N_convention"], df["C_convention"] = K6, "synthetic", "6ND"
    return df


def eval_record(row: dict) -> dict:
    """The record's `eval` field ({task: {accuracy, accuracy_norm, logprob, n, k, chance, kind}}) from a row's flat
    eval_<task>_* columns; {} when it has none."""
    from analysis.load import EVAL_COLUMN
    from scaling.record import EVAL_COLUMNS

    out: dict = {}
    names = {col: field for field, col in EVAL_COLUMNS.items()}  # column suffix -> record field
    for col, v in row.items():
        if (m := EVAL_COLUMN.match(col)) and v is not None and np.isfinite(v):
            out.setdefault(m["task"], {"n": 200, "k": 0, "kind": "mc"})[names[m["field"]]] = float(v)
    return {"eval": out} if out else {}


def write_runs_csv(path: str | Path, runs: pd.DataFrame, convention: str = "6N") -> Path:
    """`runs` as a collected run table (runs.csv: scaling.record.COLUMNS names, C in `convention`, eval columns
    kept)."""
    from scaling.record import COLUMNS

    table = runs.drop(columns=[c for c in ("excluded", "reason", "flops_per_token", "N_convention") if c in runs])
    table = table.assign(N_total=table["N"] * 1.1, budget_kind="flops", budget_convention=convention,
                         C_convention=convention, **{f"C_{convention}": table["C"]})
    first = [c for c in COLUMNS if c in table.columns]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table[first + [c for c in table.columns if c not in first]].to_csv(path, index=False)
    return path

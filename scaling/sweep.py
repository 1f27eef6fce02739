"""A planned sweep as Hydra jobs, its `sweep.json` manifest, relaunch bookkeeping, and `collect` (records -> one CSV).

The Hydra sweeper (`hydra_plugins/scaling_sweeper`) calls `expand_jobs` and `write_manifest`; everything here is plain
Python so it is tested without Hydra. `python -m scaling.sweep collect multirun/<sweep>` writes `<sweep>/runs.csv`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from scaling.plan import Plan, PlannedRun, fmt_sci

MANIFEST = "sweep.json"
RECORD = "record.json"
FINAL = ("completed", "diverged")  # a relaunch leaves these alone: a diverged run would diverge again, bit for bit


@dataclass(frozen=True)
class Job:
    name: str
    run: PlannedRun
    overrides: list[str]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(*groups: list[str]) -> list[str]:
    """Later groups win per key, so Hydra never sees the same key twice."""
    merged: dict[str, str] = {}
    for group in groups:
        for o in group:
            merged[_key(o)] = o
    return list(merged.values())


def expand_jobs(plan: Plan, sweep: str, combos: list[list[str]], run_overrides: Optional[dict] = None) -> list[Job]:
    """One job per planned run x user override combination (e.g. `train.seed=0,1` doubles the sweep).

    The plan owns shape, batch, lr and budget; user overrides apply to every run; `run_overrides` maps a glob on run
    names to extra overrides for those runs (e.g. a lower lr for the largest models) and wins over both.
    """
    combos = combos or [[]]
    jobs = []
    for combo in combos:
        # A combo that differs between jobs (a swept key) must show in the name, or run directories would collide.
        suffix = "-".join(f"{_key(o).split('.')[-1]}{o.split('=', 1)[1]}" for o in combo if _varies(o, combos))
        for run in plan.runs:
            name = f"{run.name}-{suffix}" if suffix else run.name
            tags = ",".join(f"'{t}'" for t in [sweep, *run.tags()])
            overrides = merge_overrides(
                combo,
                run.overrides(),
                [f"name={name}", f"sweep={sweep}", f"logging.group={sweep}", f"logging.tags=[{tags}]"],
                *[extra for pattern, extra in (run_overrides or {}).items() if fnmatch.fnmatch(name, pattern)],
            )
            jobs.append(Job(name, run, overrides))
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep {sweep!r}: two jobs share a run name; give swept keys distinct values.")
    return jobs


def _varies(override: str, combos: list[list[str]]) -> bool:
    key = _key(override)
    return len({o for combo in combos for o in combo if _key(o) == key}) > 1


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def manifest(plan: Plan, sweep: str, jobs: list[Job], arguments: list[str]) -> dict:
    """The analysis reads this to know which runs belong together and which are missing (README: run-record contract)."""
    spec = plan.spec
    planned = []
    for job in jobs:
        entry = job.run.manifest()
        entry.update(name=job.name, overrides=job.overrides)
        planned.append(entry)
    return {
        "name": sweep,
        "kind": spec.kind,
        "convention": plan.convention,
        "budgets": [float(c) for c in spec.budgets],
        "planned": planned,
        "skipped": plan.skipped,
        "prior_optimum_N": plan.optimum,
        "rule": _asdict(spec),
        "arguments": list(arguments),
        "git_commit": git_commit(),
    }


def _asdict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


def write_manifest(sweep_dir: Path, content: dict) -> None:
    from scaling.tracking import write_json_atomic

    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sweep_dir / MANIFEST, content)


def run_status(run_dir: Path) -> Optional[str]:
    """The status in run_dir/record.json, None if there is none; an unreadable record reads as 'corrupt' (relaunched)."""
    try:
        return json.loads((Path(run_dir) / RECORD).read_text()).get("status")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return "corrupt"


# --------------------------------------------------------------------------------------------------------------------
# collect: one row per run, the record-contract column names (analysis/load.py reads the same names)
# --------------------------------------------------------------------------------------------------------------------
COLUMNS = [
    "name", "status", "sweep", "budget", "budget_kind", "N", "N_total", "N_embedding", "D", "steps", "batch_size",
    "seq_len", "tokens_per_step", "C", "C_convention", "C_6N", "C_kaplan", "C_chinchilla", "loss", "train_loss",
    "epochs", "d_model", "n_layers", "n_heads", "d_ff", "vocab_size", "lr", "schedule", "warmup_fraction", "seed",
    "tokens_per_s", "mfu", "wall_s", "compile_s", "device_kind", "error", "diverged_step", "git_commit", "run_dir",
]


def _row(rec: dict, run_dir: Path) -> dict:
    budget = rec.get("budget") or {}
    model, optim = rec.get("model") or {}, rec.get("optim") or {}
    row = {k: rec.get(k) for k in COLUMNS}
    row.update(
        name=rec.get("name") or run_dir.name,
        # the nominal C of the IsoFLOP slice (analysis groups runs by it); NaN for step/token budgets
        budget=budget.get("value") if budget.get("kind") == "flops" else math.nan,
        budget_kind=budget.get("kind"),
        d_model=model.get("d_model"), n_layers=model.get("n_layers"), n_heads=model.get("n_heads"),
        d_ff=model.get("d_ff") or (4 * model["d_model"] if model.get("d_model") else None),
        vocab_size=model.get("vocab_size"), lr=optim.get("lr"), schedule=optim.get("schedule"),
        warmup_fraction=optim.get("warmup_fraction"), run_dir=str(run_dir),
    )
    return row


def collect(sweep_dir: Path, skip_corrupt: bool = False) -> pd.DataFrame:
    """Every record.json below sweep_dir (any depth), plus a `missing` row per run planned in sweep.json without one."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ValueError(f"sweep directory {str(root)!r} does not exist: give the folder that holds the run directories.")
    rows = []
    for path in sorted(root.rglob(RECORD)):
        try:
            rec = json.loads(path.read_text())
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            if not skip_corrupt:
                raise ValueError(f"{path} is not a readable run record ({e}): delete or rerun that run, or pass --skip-corrupt.") from None
            rows.append({"name": path.parent.name, "status": "corrupt", "error": str(e), "run_dir": str(path.parent)})
            continue
        rows.append(_row(rec, path.parent))
    manifest_path = root / MANIFEST
    if manifest_path.exists():
        try:
            planned = json.loads(manifest_path.read_text()).get("planned", [])
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{manifest_path} is not a readable sweep manifest ({e}): relaunch the sweep to rewrite it.") from None
        found = {r["name"] for r in rows}
        for p in planned:
            if p.get("name") not in found:
                rows.append({"name": p.get("name"), "status": "missing", "budget": p.get("budget"), "N": p.get("N"),
                             "D": p.get("D"), "d_model": p.get("d_model"), "n_layers": p.get("n_layers")})
    if not rows:
        raise ValueError(f"sweep directory {str(root)!r} holds no record.json and no sweep.json: point at a sweep's folder.")
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = None
    return df[COLUMNS].sort_values(["budget", "N", "name"], na_position="last").reset_index(drop=True)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)  # readers never see a half-written CSV


def summary(df: pd.DataFrame) -> str:
    counts = df["status"].value_counts().to_dict()
    lines = [", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    for _, r in df.iterrows():
        loss = f"{r['loss']:.4f}" if isinstance(r["loss"], (int, float)) and math.isfinite(r["loss"]) else "-"
        budget = fmt_sci(r["budget"]) if isinstance(r["budget"], (int, float)) and math.isfinite(r["budget"]) else "-"
        lines.append(f"  {r['name']:<40} {r['status']:<10} C={budget:<7} loss={loss}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scaling.sweep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="gather a sweep's run records into one CSV")
    c.add_argument("sweep_dir", type=Path)
    c.add_argument("-o", "--out", type=Path, default=None, help="CSV path (default: <sweep_dir>/runs.csv)")
    c.add_argument("--skip-corrupt", action="store_true", help="list unreadable records as status=corrupt")
    args = parser.parse_args(argv)
    try:
        df = collect(args.sweep_dir, skip_corrupt=args.skip_corrupt)
        out = args.out or args.sweep_dir / "runs.csv"
        write_csv(df, out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(df))
    print(f"wrote {len(df)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A planned sweep as Hydra jobs, its `sweep.json` manifest, relaunch bookkeeping, and `collect` (records -> one CSV).

The Hydra sweeper (`hydra_plugins/scaling_sweeper`) calls `expand_jobs` and `write_manifest`; everything here is plain
Python so it is tested without Hydra. `python -m scaling.sweep collect multirun/<sweep>` writes `<sweep>/runs.csv`.
The record, the manifest and the run-table columns are scaling.record's; their names are re-exported here.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from scaling.sweep.plan import Plan, PlannedRun, fmt_sci
from scaling.record import (COLUMNS, FINAL, extra_columns, git_commit, read_runs, write_manifest,  # noqa: F401
                            write_text_atomic)
from scaling.record import MANIFEST_FILE as MANIFEST  # noqa: F401
from scaling.record import RECORD_FILE as RECORD  # noqa: F401
from scaling.record import record_status as run_status  # noqa: F401


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

    The plan owns shape, batch, lr, schedule and budget, and the sweep names each run; user overrides apply to every
    run, and one that sets a key the plan sets otherwise is refused (`refuse_replaced`); `run_overrides` maps a glob on
    run names to extra overrides for those runs (e.g. a lower lr for the largest models) and wins over both.
    """
    combos = combos or [[]]
    jobs = []
    for combo in combos:
        # A combo that differs between jobs (a swept key) must show in the name, or run directories would collide.
        suffix = "-".join(f"{_key(o).split('.')[-1]}{o.split('=', 1)[1]}" for o in combo if _varies(o, combos))
        for run in plan.runs:
            name = f"{run.name}-{suffix}" if suffix else run.name
            tags = ",".join(f"'{t}'" for t in [sweep, *run.tags()])
            planned = [*run.overrides(), f"name={name}", f"sweep={sweep}", f"logging.group={sweep}",
                       f"logging.tags=[{tags}]"]
            refuse_replaced(sweep, combo, planned)
            overrides = merge_overrides(
                combo,
                planned,
                *[extra for pattern, extra in (run_overrides or {}).items() if fnmatch.fnmatch(name, pattern)],
            )
            jobs.append(Job(name, run, overrides))
    names = [j.name for j in jobs]
    unmatched = [pattern for pattern in (run_overrides or {}) if not fnmatch.filter(names, pattern)]
    if unmatched:  # a typo in a glob would otherwise leave every run as planned without a word
        raise ValueError(f"hydra.sweeper.run_overrides: {', '.join(map(repr, unmatched))} matches no run of sweep "
                         f"{sweep!r} (its runs: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): fix the "
                         "glob, or drop it.")
    if len(set(names)) != len(names):
        raise ValueError(f"sweep {sweep!r}: two jobs share a run name; give swept keys distinct values.")
    return jobs


# Where to set each key a plan sets per run, for the error that refuses a command-line value the plan would replace
# (a key ending in "." covers every key under it).
_BUDGET_HINT = "set hydra.sweeper.plan.budgets, plan.tokens or plan.grid_tokens_per_param instead"
_BRANCH_HINT = "the ladder plan places its branches (plan.tokens or plan.budgets, plan.cooldown_fraction)"
_PLAN_OWNERS = {
    "model.": "set hydra.sweeper.plan.family (widths, depth, heads) or plan.sizes instead",
    "train.batch_size": "set hydra.sweeper.plan.hyper.base_batch / min_batch / max_batch instead",
    "train.tokens": _BUDGET_HINT,
    "train.flops": _BUDGET_HINT,
    "train.steps": _BUDGET_HINT,
    "optim.lr": "set hydra.sweeper.plan.hyper.base_lr (the lr rule), plan.lrs or plan.lr_multipliers (an lr sweep), "
                "or hydra.sweeper.run_overrides (some runs) instead",
    "optim.schedule": "set hydra.sweeper.plan.hyper.schedule instead",
    "optim.warmup_fraction": "set hydra.sweeper.plan.hyper.warmup_fraction instead",
    "optim.warmup_steps": "set hydra.sweeper.plan.hyper.warmup_steps instead",
    "optim.decay_fraction": "set hydra.sweeper.plan.cooldown_fraction instead",
    "optim.decay_shape": "set hydra.sweeper.plan.cooldown_shape instead",
    "train.seed": "set hydra.sweeper.plan.seeds instead",
    "train.parent": _BRANCH_HINT,
    "train.branch_step": _BRANCH_HINT,
    "train.checkpoint.keep_steps": "a ladder's parents keep their branch points",
    "name": "the sweep names each run (sweep=... names the sweep)",
    "logging.group": "each run's group is the sweep's name: set sweep=... instead",
    "logging.tags": "the sweep tags each run with its sweep, budget and shape",
}


def _same_value(a: str, b: str) -> bool:
    """Two override values that mean the same (1e-3 and 0.001; null and None; lists with or without spaces)."""
    unquoted = str.maketrans("", "", " '\"")
    if a.translate(unquoted) == b.translate(unquoted):
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return {a.strip().lower(), b.strip().lower()} <= {"null", "none", "~"}


def refuse_replaced(sweep: str, combo: list[str], planned: list[str]) -> None:
    """A user override of a key that the plan sets to another value would be replaced without a word (a ladder run
    with optim.decay_shape=1-sqrt on the command line would cool down linearly): refused, naming where to set it."""
    plan_values = {_key(o): o.split("=", 1)[1] for o in planned}
    run = plan_values.get("name", "?")
    clashes = []
    for o in combo:
        if "=" not in o or _key(o) not in plan_values:
            continue
        key, value = _key(o), o.split("=", 1)[1]
        if not _same_value(value, plan_values[key]):
            owner = next((v for k, v in _PLAN_OWNERS.items() if key == k or (k.endswith(".") and key.startswith(k))),
                         "set it in hydra.sweeper.plan instead")
            clashes.append(f"{key}={value} (run {run} gets {plan_values[key]}; {owner})")
    if clashes:
        raise ValueError(f"sweep {sweep!r}: the plan sets these keys for its runs and would replace the command line's "
                         f"values: {'; '.join(clashes)}. Drop them from the command line.")


def _varies(override: str, combos: list[list[str]]) -> bool:
    key = _key(override)
    return len({o for combo in combos for o in combo if _key(o) == key}) > 1


# --------------------------------------------------------------------------------------------------------------------
# schedule: which jobs a launch starts, and which runs train together (pure; the Hydra plugin only adapts it)
# --------------------------------------------------------------------------------------------------------------------
VMAP_MODES = ("auto", "true", "false")


def parse_vmap(value: str | bool) -> str:
    """`hydra.sweeper.vmap` / train_group's vmap: auto (on for GPU/TPU, off on CPU), true or false."""
    mode = str(value).lower()
    if mode not in VMAP_MODES:
        raise ValueError(f"vmap={value!r} is invalid: use auto (on for GPU/TPU, off on CPU), true or false "
                         "(e.g. hydra.sweeper.vmap=auto).")
    return mode


def groups_runs(vmap: str | bool, plan_kind: str, replicated: bool = False) -> bool:
    """Whether same-shape runs form one job: always under vmap=true; under auto only for lr plans and seed-replicated
    plans (whose runs differ only in lr / seed: scaling.train.stack.FREE_FIELDS), the job then deciding from its
    device whether to vmap them (scaling.train.loop.train_group)."""
    mode = parse_vmap(vmap)
    return mode == "true" or (mode == "auto" and (plan_kind == "lr" or replicated))


@dataclass(frozen=True)
class Schedule:
    groups: list[list[Job]]  # every planned job, in the group it trains with (singletons unless grouped)
    singles: list[Job]  # unfinished runs of one-run groups: one ordinary job each
    grouped: list[list[Job]]  # unfinished members of multi-run groups: one job per group (lead first)
    finished: list[str]  # runs whose record is final: left alone
    branches: list[Job]  # unfinished ladder branches: launched after everything else, once their parents have trained

    @property
    def job_group(self) -> dict[str, str]:
        """run name -> the name of its group's lead (the job that trains it), for the manifest."""
        return {j.name: g[0].name for g in self.groups for j in g}

    @property
    def n_runs(self) -> int:
        return len(self.singles) + sum(map(len, self.grouped)) + len(self.branches)

    @property
    def n_jobs(self) -> int:
        return len(self.singles) + len(self.grouped) + len(self.branches)


def schedule(jobs: list[Job], statuses: dict[str, Optional[str]], group_keys: Optional[dict[str, str]] = None,
             max_k: int = 16, skip_finished: bool = True) -> Schedule:
    """Jobs to launch from the plan's jobs and the status of each one's run directory (`record_status`).

    `group_keys` (run name -> scaling.train.stack.group_key of its config; None: no grouping) puts runs with equal keys in groups
    of at most `max_k`, in plan order. A relaunch leaves final runs alone, so a partly finished group launches only
    its unfinished members (as a smaller group: scaling.train.loop.train_runs).
    """
    if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
        raise ValueError(f"hydra.sweeper.max_k={max_k!r} is invalid: use a positive integer (runs per vmapped group).")
    if group_keys is None:
        groups = [[j] for j in jobs]
    else:
        by_key: dict[str, list[Job]] = {}
        for j in jobs:  # a ladder's runs train alone: a branch reads its parent's own checkpoints
            by_key.setdefault(j.name if j.run.role else group_keys[j.name], []).append(j)
        groups = [g[i:i + max_k] for g in by_key.values() for i in range(0, len(g), max_k)]
    final = {j.name for j in jobs if skip_finished and statuses.get(j.name) in FINAL}
    todo = [[j for j in g if j.name not in final] for g in groups]
    singles = [t[0] for g, t in zip(groups, todo) if len(g) == 1 and t]
    return Schedule(groups=groups, singles=[j for j in singles if not j.run.parent],
                    grouped=[t for g, t in zip(groups, todo) if len(g) > 1 and t],
                    finished=[j.name for j in jobs if j.name in final],
                    branches=[j for j in singles if j.run.parent])


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


def collect(sweep_dir: Path, skip_corrupt: bool = False) -> pd.DataFrame:
    """Every record.json below sweep_dir (any depth), plus a `missing` row per run planned in sweep.json without one."""
    rows = read_runs(sweep_dir, skip_corrupt=skip_corrupt)
    df = pd.DataFrame(rows, columns=COLUMNS + extra_columns(rows))  # eval_<task>_* after COLUMNS
    return df.sort_values(["budget", "N", "name"], na_position="last").reset_index(drop=True)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    write_text_atomic(path, buf.getvalue())  # readers never see a half-written CSV


def summary(df: pd.DataFrame) -> str:
    counts = df["status"].value_counts().to_dict()
    lines = [", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    if len(df) and "C_spent" in df:
        # A ladder's points share their parents' steps: what the sweep cost is below what its points' C add up to.
        points = df[df["role"] != "parent"] if "role" in df else df
        conv = ",".join(sorted(set(df["C_convention"].dropna()))) or "?"
        lines.append(f"FLOPs spent {df['C_spent'].sum():.4g} ({conv}); sum of C over its {len(points)} points "
                     f"{points['C'].sum():.4g}")
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

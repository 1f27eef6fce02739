"""Load runs into one tidy table: a sweep directory of run records, a CSV, or wandb runs (offline files or the API).

Every loader returns a DataFrame with one row per run and these columns (the fits read only these):
  name, status, excluded (bool), reason, N, D, C, loss, budget (planned FLOPs, NaN if not an IsoFLOP budget),
  N_convention ("non_embedding" | "total" | "csv" | ...), C_convention ("6ND" | "6N" | "kaplan" | ...),
  flops_per_token (C / (N D), the k of C = k N D used for compute-optimal conversions), plus source extras
  (sweep directories: lr, the peak learning rate from record["optim"]["lr"], NaN when absent).
Failed, diverged, running or unusable runs stay in the table with `excluded=True` and a reason; `usable()` drops them.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

N_CONVENTIONS = {"non_embedding": "N", "total": "N_total"}  # Kaplan et al. 2020 use non-embedding N
C_CONVENTIONS = ("6ND", "6N", "kaplan", "chinchilla", "record")  # "6ND" recomputes 6 N D with the chosen N
COLUMNS = ["name", "status", "excluded", "reason", "N", "D", "C", "loss", "budget", "N_convention", "C_convention",
           "flops_per_token"]


def _check_conventions(n: str, c: str) -> None:
    if n not in N_CONVENTIONS:
        raise ValueError(f"N convention {n!r} is unknown; use one of {sorted(N_CONVENTIONS)}")
    if c not in C_CONVENTIONS:
        raise ValueError(f"C convention {c!r} is unknown; use one of {list(C_CONVENTIONS)}")


def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def _exclusion(status: str, N: float, D: float, loss: float, extra: str = "") -> str:
    """Why a run cannot enter a fit ('' if it can)."""
    if status != "completed":
        return f"status {status}" + (f": {extra}" if extra else "")
    for sym, v in (("N", N), ("D", D), ("loss", loss)):
        if not (np.isfinite(v) and v > 0):
            return f"{sym} is missing or not positive ({v})"
    return ""


def _finish(rows: list[dict], n_conv: str, c_conv: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    df["N_convention"], df["C_convention"] = n_conv, c_conv
    df["reason"] = df["reason"].fillna("")
    df["excluded"] = df["reason"] != ""
    with np.errstate(invalid="ignore", divide="ignore"):
        df["flops_per_token"] = df["C"] / (df["N"] * df["D"])
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]


def usable(df: pd.DataFrame) -> pd.DataFrame:
    """Runs that enter fits."""
    return df[~df["excluded"]].reset_index(drop=True)


def excluded(df: pd.DataFrame) -> pd.DataFrame:
    """Runs kept in the table but left out of fits, with the reason."""
    return df[df["excluded"]].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------------
# Sweep directories of run records (record.json + metrics.jsonl, see the README's run-record contract)
# --------------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc}); check the path and permissions") from None
    if not text.strip():
        raise ValueError(f"{path}: file is empty; rerun or delete that run (or pass skip_corrupt=True)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); rerun or delete that run (or pass skip_corrupt=True)") \
            from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}; it is not a run record")
    return obj


def _record_row(rec: dict, run_dir: Path, n_conv: str, c_conv: str) -> dict:
    N = _num(rec.get(N_CONVENTIONS[n_conv]))
    D = _num(rec.get("D"))
    if c_conv == "6ND":
        C = 6.0 * N * D  # Kaplan et al. 2020 eq. 2.1, with the chosen N
    elif c_conv == "record":
        C = _num(rec.get("C"))
    else:
        C = _num(rec.get(f"C_{c_conv}"))
    budget = rec.get("budget") or {}
    status = str(rec.get("status") or "unknown")
    extra = rec.get("error") or (f"diverged at step {rec['diverged_step']}" if rec.get("diverged_step") is not None
                                 else "")
    loss = _num(rec.get("loss"))
    return {
        "name": str(rec.get("name") or run_dir.name), "status": status,
        "reason": _exclusion(status, N, D, loss, str(extra)), "N": N, "D": D, "C": C, "loss": loss,
        "budget": _num(budget.get("value")) if budget.get("kind") == "flops" else math.nan,
        "sweep": rec.get("sweep"), "seed": rec.get("seed"), "train_loss": _num(rec.get("train_loss")),
        "record_C": _num(rec.get("C")), "run_dir": str(run_dir),
        "lr": _num((rec.get("optim") or {}).get("lr")),  # peak learning rate; groups learning-rate sweeps
    }


def load_sweep(sweep_dir: str | Path, *, n: str = "non_embedding", c: str = "6ND",
               skip_corrupt: bool = False) -> pd.DataFrame:
    """All runs below `sweep_dir` (any depth, found by record.json), plus planned runs without a record."""
    _check_conventions(n, c)
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ValueError(f"sweep directory {str(root)!r} does not exist; give the folder holding the run directories")
    rows = []
    for path in sorted(root.rglob("record.json")):
        try:
            rows.append(_record_row(_read_json(path), path.parent, n, c))
        except ValueError as exc:
            if not skip_corrupt:
                raise
            rows.append({"name": path.parent.name, "status": "corrupt", "reason": str(exc), "run_dir": str(path.parent)})
    manifest = root / "sweep.json"
    if manifest.exists():
        found = {r["name"] for r in rows}
        for plan in _read_json(manifest).get("planned", []):
            if plan.get("name") not in found:
                # N, D and lr as planned (NaN when the plan lacks them): they place the run in its lr-sweep group.
                rows.append({"name": plan.get("name"), "status": "missing",
                             "reason": "planned in sweep.json but no record.json found",
                             "budget": _num(plan.get("budget")), "N": _num(plan.get("N")), "D": _num(plan.get("D")),
                             "lr": _num(plan.get("lr"))})
    if not rows:
        raise ValueError(f"sweep directory {str(root)!r} holds no record.json; point at a folder of finished runs")
    return _finish(rows, n, c)


def load_curves(sweep_dir: str | Path, *, loss: str = "train_loss", n: str = "non_embedding",
                c: str = "6ND") -> pd.DataFrame:
    """Training curves of usable runs (for Chinchilla Approach 1): columns run, N, C, D, loss, one row per step.

    metrics.jsonl `flops` is cumulative C under the run's own convention; it is rescaled to the chosen C convention
    (C_chosen / C_record), so the curve ends at the run's C in the table.
    """
    if loss not in ("train_loss", "eval_loss"):
        raise ValueError(f"curve loss {loss!r} is unknown; use 'train_loss' or 'eval_loss'")
    runs = usable(load_sweep(sweep_dir, n=n, c=c, skip_corrupt=True))
    frames = []
    for r in runs.itertuples():
        path = Path(r.run_dir) / "metrics.jsonl"
        if not path.exists():
            continue
        lines = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {i + 1} is not JSON ({exc}); fix or truncate the file") from None
        m = pd.DataFrame(lines)
        if m.empty or loss not in m.columns or "tokens" not in m.columns or "flops" not in m.columns:
            continue
        m = m.dropna(subset=[loss])
        scale = r.C / r.record_C if np.isfinite(r.record_C) and r.record_C > 0 else 1.0
        frames.append(pd.DataFrame({"run": r.name, "N": r.N, "C": m["flops"].astype(float) * scale,
                                    "D": m["tokens"].astype(float), "loss": m[loss].astype(float)}))
    if not frames:
        raise ValueError(f"no usable run below {str(sweep_dir)!r} has a metrics.jsonl with tokens, flops and {loss}")
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------------------------------
# CSV with user-named columns
# --------------------------------------------------------------------------------------------------------------------
def load_csv(path: str | Path, *, N: str, D: str, loss: str, C: str | None = None, name: str | None = None,
             dropna: bool = False, flops_per_token: float = 6.0) -> pd.DataFrame:
    """Any CSV: the user names the columns. Without `C`, C = flops_per_token * N * D (6ND, Kaplan et al. eq. 2.1).
    With `C`, that column is also the IsoFLOP budget that groups runs for Approach 2."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"CSV {str(p)!r} does not exist; check the path")
    try:
        raw = pd.read_csv(p)
    except pd.errors.EmptyDataError:
        raise ValueError(f"CSV {str(p)!r} is empty; it needs a header row and one row per run") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"CSV {str(p)!r} cannot be parsed ({exc}); is it a comma-separated text file?") from None
    if raw.empty:
        raise ValueError(f"CSV {str(p)!r} has a header but no rows; add one row per run")
    wanted = {"N": N, "D": D, "loss": loss} | ({"C": C} if C else {}) | ({"name": name} if name else {})
    missing = {k: v for k, v in wanted.items() if v not in raw.columns}
    if missing:
        k, v = next(iter(missing.items()))
        raise ValueError(f"CSV {str(p)!r}: column {v!r} (for {k}) not found; available columns: {list(raw.columns)}")
    out = pd.DataFrame({k: pd.to_numeric(raw[v], errors="coerce") for k, v in wanted.items() if k != "name"})
    nan_rows = out.isna().any(axis=1)
    if nan_rows.any() and not dropna:
        i = int(np.flatnonzero(nan_rows)[0])
        bad = [wanted[k] for k in out.columns if pd.isna(out.iloc[i][k])]
        raise ValueError(f"CSV {str(p)!r}: {int(nan_rows.sum())} row(s) have empty or non-numeric values (first: "
                         f"data row {i + 1}, column {bad[0]!r}); fix them or pass --dropna to drop them")
    out = out[~nan_rows].reset_index(drop=True)
    raw = raw[~nan_rows.to_numpy()].reset_index(drop=True)
    for k in out.columns:
        if (out[k] <= 0).any():
            i = int(np.flatnonzero(out[k] <= 0)[0])
            raise ValueError(f"CSV {str(p)!r}: column {wanted[k]!r} has non-positive value {out[k].iloc[i]:g} at data "
                             f"row {i + 1}; power laws need positive {k}, fix or drop that row")
    if out.empty:
        raise ValueError(f"CSV {str(p)!r}: no rows left after dropping NaN rows")
    if C:
        out["budget"] = out["C"]
    else:
        out["C"] = flops_per_token * out["N"] * out["D"]
    out["name"] = raw[name].astype(str) if name else [f"row{i}" for i in range(len(out))]
    out["status"], out["reason"] = "completed", ""
    return _finish(out.to_dict("records"), "csv", f"column {C}" if C else f"{flops_per_token:g}ND")


# --------------------------------------------------------------------------------------------------------------------
# wandb: offline run files (no server) and the public API (a server)
# --------------------------------------------------------------------------------------------------------------------
WANDB_STATUS = {"finished": "completed", "crashed": "failed", "failed": "failed", "killed": "failed",
                "running": "running"}


def _wandb_row(name: str, state: str, summary: dict, config: dict, group: Any, keys: dict, n_conv: str) -> dict:
    def get(k):
        v = summary.get(k)
        return _num(config.get(k) if v is None else v)

    N, D, loss = get(keys["N"]), get(keys["D"]), get(keys["loss"])
    status = str(summary.get("status") or WANDB_STATUS.get(state, state))
    C = get(keys["C"]) if keys.get("C") else 6.0 * N * D
    return {"name": name, "status": status, "reason": _exclusion(status, N, D, loss, str(summary.get("error") or "")),
            "N": N, "D": D, "C": C, "loss": loss, "budget": get(keys["budget"]) if keys.get("budget") else math.nan,
            "sweep": group}


def _wandb_cli() -> list[str]:
    return [sys.executable, "-m", "wandb"]


def read_wandb_file(path: str | Path) -> dict:
    """One offline run (.wandb transaction log) via `wandb leet inspect` (the reader wandb ships; no server, no
    key): {"name", "state", "summary", "config", "group", "history": [step dicts]}."""
    import subprocess

    p = str(path)
    cmd = _wandb_cli() + ["leet", "inspect"]
    try:
        summ = subprocess.run(cmd + ["--summary", "--json", p], capture_output=True, text=True, timeout=120)
        recs = subprocess.run(cmd + ["--json", p], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"wandb file {p!r}: `wandb leet inspect` could not run ({exc}); is wandb >= 0.31 installed?") \
            from None
    if summ.returncode != 0 or recs.returncode != 0:
        raise ValueError(f"wandb file {p!r}: `wandb leet inspect` failed ({(summ.stderr or recs.stderr).strip()[:300]});"
                         " is it a complete .wandb file?")
    try:
        info = json.loads(summ.stdout)
    except json.JSONDecodeError:
        raise ValueError(f"wandb file {p!r}: unreadable summary from `wandb leet inspect`; is the file complete?") \
            from None
    group, history = None, []
    for line in recs.stdout.splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("type") == "run":
            group = r["run"].get("run_group") or group
        elif r.get("type") == "history":
            history.append(r["history"].get("item", {}))
    return {"name": info.get("name") or info.get("run_id"), "state": info.get("state", "unknown"),
            "summary": info.get("summary") or {}, "config": info.get("config") or {}, "group": group,
            "history": history}


def _keys(N: str, D: str, loss: str, C: str | None, budget: str | None) -> dict:
    return {"N": N, "D": D, "loss": loss, "C": C, "budget": budget}


def load_wandb_offline(path: str | Path, *, N: str = "N", D: str = "D", loss: str = "loss", C: str | None = None,
                       budget: str | None = None, n_convention: str = "wandb") -> pd.DataFrame:
    """Every offline run below `path` (a wandb/ folder or any parent): values from the summary, else the config."""
    files = sorted(Path(path).rglob("*.wandb")) if Path(path).is_dir() else [Path(path)]
    files = [f for f in files if f.is_file()]
    if not files:
        raise ValueError(f"no .wandb run file below {str(path)!r}; give the folder that wandb.init(dir=...) wrote to")
    keys = _keys(N, D, loss, C, budget)
    rows = []
    for f in files:
        r = read_wandb_file(f)
        rows.append(_wandb_row(r["name"], r["state"], r["summary"], r["config"], r["group"], keys, n_convention)
                    | {"run_dir": str(f.parent)})
    return _finish(rows, n_convention, f"summary {C}" if C else "6ND")


def load_wandb_api(api: Any, path: str, *, group: str | None = None, N: str = "N", D: str = "D",
                   loss: str = "loss", C: str | None = None, budget: str | None = None) -> pd.DataFrame:
    """Runs of `entity/project` (optionally one group) from a `wandb.Api()`-like object (needs a server)."""
    runs: Iterable = api.runs(path, filters={"group": group} if group else None)
    keys = _keys(N, D, loss, C, budget)
    rows = [_wandb_row(r.name, r.state, dict(r.summary), dict(r.config), getattr(r, "group", None), keys, "wandb")
            for r in runs]
    if not rows:
        raise ValueError(f"wandb project {path!r}{f' group {group!r}' if group else ''} has no runs; check the names")
    return _finish(rows, "wandb", f"summary {C}" if C else "6ND")

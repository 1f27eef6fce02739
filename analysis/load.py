"""Load runs into one tidy table: a sweep directory of run records, a collected runs.csv, any CSV, or wandb runs
(offline files or the API).

Every loader returns a DataFrame with one row per run and these columns (the fits read only these):
  name, status, excluded (bool), reason, N, D, C, loss, budget (planned FLOPs, NaN if not an IsoFLOP budget),
  N_convention ("non_embedding" | "total" | "csv" | ...), C_convention ("chinchilla" | "6N" | "kaplan" | "6ND" | ...),
  flops_per_token (C / (N D), the k of C = k N D used for compute-optimal conversions), plus source extras
  (budget_C: the budget in the table's C convention at the run's shape, budget_convention, C_record: the run's own
  C, lr: the peak learning rate, sweep, seed, train_loss, epochs, run_dir; eval_<task>_acc/_acc_norm/_logprob/_chance of
  evaluated runs, EVAL_COLUMN).
Failed, diverged, running or unusable runs stay in the table with `excluded=True` and a reason; `usable()` drops them.
Records also give the validation text's bytes_per_token, chars_per_token, bpb and bits_per_char (TEXT_COLUMNS); with
`target="bpb"` (or "bits_per_char") the loaders put that in `loss`, the column every fit reads (`select_target`).

One convention end to end: C is the convention the records carry (the one the sweep was planned in, `C_convention`)
unless another is asked (`c=`, the CLI's --c-convention); then each run's C and budget are converted through
scaling.accounting. Records (and wandb summaries) are read through scaling.record, the run record's owner.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from scaling import record as R
from scaling.accounting import C_CONVENTIONS, FLOP_CONVENTIONS, C_under, convert_C

N_CONVENTIONS = {"non_embedding": "N", "total": "N_total"}  # Kaplan et al. 2020 use non-embedding N
OWN = "record"  # --c-convention record: an alias of the default, the convention each record carries
COLUMNS = ["name", "status", "excluded", "reason", "N", "D", "C", "loss", "budget", "N_convention", "C_convention",
           "flops_per_token"]
# Per-task evaluation columns of a run-table row (scaling.record.record_row): eval_<task>_acc, _acc_norm, _logprob,
# _chance (analysis.laws.downstream reads them)
EVAL_COLUMN = re.compile(r"^eval_(?P<task>.+)_(?P<field>"
                         + "|".join(sorted(R.EVAL_COLUMNS.values(), key=len, reverse=True)) + ")$")  # acc_norm first
EXTRAS = ["budget_C", "budget_convention", "C_record", "sweep", "seed", "train_loss", "lr", "run_dir"]
# The validation text's size per token and the loss per byte / character (scaling.record.text_metrics).
TEXT_COLUMNS = ("bytes_per_token", "chars_per_token", "bpb", "bits_per_char")
# What a fit takes as L (--target): the loss per token, or per byte / character of text, which compares runs whose
# tokenizers cut the same text differently (Gao et al. 2020, The Pile, sec. 4).
TARGETS = {"loss": "nats/token", "bpb": "bits per byte", "bits_per_char": "bits per character"}


def _check_conventions(n: str, c: str | None) -> None:
    if n not in N_CONVENTIONS:
        raise ValueError(f"N convention {n!r} is unknown; use one of {sorted(N_CONVENTIONS)}")
    if c not in (None, OWN) + C_CONVENTIONS:
        raise ValueError(f"C convention {c!r} is unknown; use one of {list(C_CONVENTIONS)} (default: the records' own)")


def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def _str(x) -> str:
    """A text cell: '' for None / NaN (CSV and DataFrame cells of absent values)."""
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else str(x)


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
# Run tables (scaling.record.COLUMNS): sweep directories of records, collected runs.csv files, wandb summaries
# --------------------------------------------------------------------------------------------------------------------
def own_convention(rows: Iterable[dict], where: str) -> str | None:
    """The one C convention the runs carry (their `C_convention`); None when none does. Runs of one table in different
    conventions are one clear error: their C are not comparable until one convention is chosen."""
    counts: dict[str, int] = {}
    for r in rows:
        conv = _str(r.get("C_convention"))
        if conv:
            counts[conv] = counts.get(conv, 0) + 1
    if len(counts) > 1:
        seen = ", ".join(f"{k} ({v} runs)" for k, v in sorted(counts.items()))
        raise ValueError(f"{where}: the runs carry different C conventions ({seen}, field C_convention); pick one "
                         f"with --c-convention {'|'.join(C_CONVENTIONS)} (c=... in Python): every run's C and "
                         "budget are then converted to it")
    return next(iter(counts), None)


def _reason(r: dict, status: str, N: float, D: float, loss: float) -> str:
    if status == "missing":
        return "planned in sweep.json but no record.json found"
    step = _num(r.get("diverged_step"))
    extra = _str(r.get("error")) or (f"diverged at step {int(step)}" if np.isfinite(step) else "")
    return _exclusion(status, N, D, loss, extra)


def _C_by_convention(r: dict) -> dict:
    """What a row carries of C per FLOP convention (C_6N, C_kaplan, C_chinchilla; its own C under its own)."""
    out = {k: _num(r.get(f"C_{k}")) for k in FLOP_CONVENTIONS}
    own = _str(r.get("C_convention"))
    if own in FLOP_CONVENTIONS and np.isfinite(_num(r.get("C"))):
        out[own] = _num(r.get("C"))  # exact: C under its own convention needs no conversion
    return {k: v for k, v in out.items() if np.isfinite(v)}


def runs_table(rows: Iterable[dict], *, n: str = "non_embedding", c: str | None = None,
               where: str = "run table") -> pd.DataFrame:
    """Run-table rows (scaling.record.COLUMNS) -> the analysis table, with C in convention `c` (default: the runs' own,
    see `own_convention`; other conventions are converted per run through scaling.accounting)."""
    _check_conventions(n, c)
    # Runs in run-directory order whatever the source (records, runs.csv, wandb files), planned-but-missing ones last:
    # the seeded bootstrap then draws the same runs, so the same runs give the same intervals from every loader.
    rows = sorted(rows, key=lambda r: (0, Path(r["run_dir"]).parts) if _str(r.get("run_dir")) else (1, ()))
    conv = c if c not in (None, OWN) else (own_convention(rows, where) or "6ND")
    out = []
    for r in rows:
        status = _str(r.get("status")) or "unknown"
        N, D, loss = _num(r.get(N_CONVENTIONS[n])), _num(r.get("D")), _num(r.get("loss"))
        reason = _reason(r, status, N, D, loss)
        if not reason and _str(r.get("role")) == "parent":
            reason = ("a ladder parent: its loss ends a constant-lr stable phase, no point of a law (its branches, "
                      "which cool down, are)")
        C_record, own = _num(r.get("C")), _str(r.get("C_convention"))
        by_conv = _C_by_convention(r)
        budget = _num(r.get("budget")) if _str(r.get("budget_kind")) in ("flops", "") else math.nan
        # A flops budget is planned in the run's own convention unless the row says otherwise (scaling.train.loop).
        budget_conv = _str(r.get("budget_convention")) or own
        try:
            C = C_record if conv == own else C_under(conv, by_conv, N, D)
            budget_C = (budget if not np.isfinite(budget) or budget_conv == conv else
                        convert_C(budget, by_conv, budget_conv, conv, N, D))
        except ValueError as exc:
            if reason:  # an excluded run needs no C
                C, budget_C = math.nan, math.nan
            else:
                raise ValueError(f"{where}: run {_str(r.get('name'))!r} cannot be read in the {conv} convention "
                                 f"({exc}); choose another --c-convention or the runs' own ({own})") from None
        if not reason and not (np.isfinite(_num(C)) and _num(C) > 0):
            reason = f"C is missing or not positive ({_num(C)})"
        out.append({"name": _str(r.get("name")) or Path(_str(r.get("run_dir"))).name, "status": status,
                    "reason": reason, "N": N, "D": D, "C": _num(C), "loss": loss, "budget": budget,
                    "budget_C": _num(budget_C), "budget_convention": budget_conv or None, "C_record": C_record,
                    "sweep": r.get("sweep"), "seed": r.get("seed"), "train_loss": _num(r.get("train_loss")),
                    "lr": _num(r.get("lr")),  # peak learning rate; groups learning-rate sweeps
                    "schedule": _str(r.get("schedule")) or None, "role": _str(r.get("role")) or None,
                    "parent": _str(r.get("parent")) or None, "C_spent": _num(r.get("C_spent")),
                    **{k: _num(r.get(k)) for k in TEXT_COLUMNS},  # NaN in records written before them
                    "epochs": _num(r.get("epochs")),  # D / unique training tokens (analysis.laws.data_constrained)
                    "run_dir": r.get("run_dir"),
                    **{k: _num(v) for k, v in r.items() if EVAL_COLUMN.match(k)}})
    return _finish(out, n, conv)


def _data_identity(run_dir: str) -> tuple[str, str, str] | None:
    """(source identity, tokenizer identity, source description) of a run's record; None when it has none (records
    written before data identity, planned or corrupt runs)."""
    try:
        rec = R.read_record(run_dir)
    except (FileNotFoundError, R.RecordError):
        return None
    data, tok = rec.get("data"), rec.get("tokenizer")
    source = _str(data.get("source")) if isinstance(data, dict) else ""
    tokenizer = _str(tok.get("identity")) if isinstance(tok, dict) else ""
    if not (source or tokenizer):
        return None
    return source, tokenizer, _str(data.get("source_description")) if isinstance(data, dict) else ""


def check_one_data(rows: list[dict], where: str, target: str = "loss") -> None:
    """Losses on different corpora or tokenizers are not comparable (nats per token of another token set): runs whose
    records name different data (`data.source`, its content hash included) or tokenizers (`tokenizer.identity`) are
    one clear error naming the groups and where each lives. A per-byte or per-character `target` compares tokenizers
    on one text: then only the data must agree."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        ident = _data_identity(r["run_dir"]) if _str(r.get("run_dir")) else None
        if ident:
            key = ident[:2] if target == "loss" else (ident[0], "")
            groups.setdefault(key, []).append(r | {"_desc": ident[2]})
    if len(groups) < 2:
        return
    parts = []
    for (source, tokenizer), members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        dirs = [str(Path(m["run_dir"]).parent) for m in members]
        home = os.path.commonpath(dirs) if len(set(dirs)) > 1 else dirs[0]
        by_tokenizer = f" with tokenizer {tokenizer or '?'}" if target == "loss" else ""
        parts.append(f"{len(members)} run(s) on {members[0]['_desc'] or source} (data.source {source}){by_tokenizer}, "
                     f"under {home}")
    raise ValueError(f"{where}: the runs were trained on different data or tokenizers, whose losses are not "
                     f"comparable: {'; '.join(parts)}. Point at a folder holding one group's runs, or pass "
                     "--allow-mixed-data (mixed_data=True) to fit them together anyway")


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target {target!r} is unknown; use one of {', '.join(TARGETS)} (--target)")


def select_target(df: pd.DataFrame, target: str = "loss") -> pd.DataFrame:
    """The table with `loss` = the `target` column (TARGETS), which the fits read as L; the loss per token is kept as
    `loss_per_token`. Runs without the target (records written before bits per byte, tokens without text) are excluded
    with the reason; a table where no run has it is one clear error."""
    _check_target(target)
    if target == "loss":
        return df
    out = df.copy()
    values = out[target].astype(float) if target in out.columns else pd.Series(np.nan, index=out.index)
    has = np.isfinite(values) & (values > 0)
    if not (has & ~out["excluded"]).any():
        raise ValueError(f"none of the {int((~out['excluded']).sum())} usable runs carries {target} "
                         f"({TARGETS[target]}): their records predate it or their tokens have no text (synthetic "
                         "data); fit --target loss, or retrain them with this version")
    out["loss_per_token"], out["loss"] = out["loss"], values
    out.loc[~has & ~out["excluded"], "reason"] = (f"no {target}: a record written before bits per byte, or tokens "
                                                 "without text (synthetic data)")
    out["excluded"], out["target"] = out["reason"] != "", target
    return out


def load_sweep(sweep_dir: str | Path, *, n: str = "non_embedding", c: str | None = None,
               skip_corrupt: bool = False, mixed_data: bool = False, target: str = "loss") -> pd.DataFrame:
    """All runs below `sweep_dir` (any depth, found by record.json), plus planned runs without a record, with `loss`
    the fit `target` (`select_target`). Runs on different data (or, for a per-token loss, tokenizers) are refused
    unless `mixed_data` (`check_one_data`)."""
    _check_conventions(n, c)
    _check_target(target)
    rows = R.read_runs(sweep_dir, skip_corrupt=skip_corrupt)
    if not mixed_data:
        check_one_data(rows, str(sweep_dir), target)
    return select_target(runs_table(rows, n=n, c=c, where=str(sweep_dir)), target)


RUN_TABLE_COLUMNS = ("name", "status", "N", "D", "C", "C_convention", "loss")  # what makes a CSV a collected run table


def is_runs_csv(path: str | Path) -> bool:
    """Whether `path` is a run table written by `python -m scaling.sweep collect` (record columns, C_convention)."""
    try:
        header = pd.read_csv(path, nrows=0).columns
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return False
    return set(RUN_TABLE_COLUMNS) <= set(header)


def load_runs_csv(path: str | Path, *, n: str = "non_embedding", c: str | None = None,
                  target: str = "loss") -> pd.DataFrame:
    """A run table collected by `python -m scaling.sweep collect` (runs.csv): the same table as `load_sweep` on the
    sweep directory it came from, without the training curves."""
    _check_conventions(n, c)
    _check_target(target)
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"run table {str(p)!r} does not exist; check the path")
    if not is_runs_csv(p):
        raise ValueError(f"{str(p)!r} is not a collected run table (it lacks some of the columns "
                         f"{list(RUN_TABLE_COLUMNS)}); name its columns with `analysis fit --csv ... --N --D --loss`")
    raw = pd.read_csv(p)
    return select_target(runs_table(raw.to_dict("records"), n=n, c=c, where=str(p)), target)


def load_curves(sweep_dir: str | Path, *, loss: str = "train_loss", n: str = "non_embedding",
                c: str | None = None, mixed_data: bool = False, target: str = "loss") -> pd.DataFrame:
    """Training curves of usable runs (for Chinchilla Approach 1): columns run, N, C, D, loss, one row per step.

    metrics.jsonl `flops` is cumulative C under the run's own convention; it is rescaled to the chosen C convention
    (C / C_record), so the curve ends at the run's C in the table. A per-byte `target` rescales each run's losses by
    its final target / loss: exact for eval_loss (the same validation text), for train_loss it takes the training
    text to have the validation text's bytes per token.
    """
    if loss not in ("train_loss", "eval_loss"):
        raise ValueError(f"curve loss {loss!r} is unknown; use 'train_loss' or 'eval_loss'")
    runs = usable(load_sweep(sweep_dir, n=n, c=c, skip_corrupt=True, mixed_data=mixed_data, target=target))
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
        scale = r.C / r.C_record if np.isfinite(r.C_record) and r.C_record > 0 else 1.0
        per_unit = 1.0 if target == "loss" else r.loss / r.loss_per_token  # 1 / (ln 2 bytes_per_token) for bpb
        frames.append(pd.DataFrame({"run": r.name, "N": r.N, "C": m["flops"].astype(float) * scale,
                                    "D": m["tokens"].astype(float), "loss": m[loss].astype(float) * per_unit}))
    if not frames:
        raise ValueError(f"no usable run below {str(sweep_dir)!r} has a metrics.jsonl with tokens, flops and {loss}")
    return pd.concat(frames, ignore_index=True)


def endpoint_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Chinchilla Approach 1's curves from valid points only: per model size (N), the final losses of its usable runs
    at their D and C, in increasing C (columns run, N, C, D, loss).

    A run's intermediate losses are not the losses of runs of that length: a cosine run has not annealed at step t < T
    (Hoffmann et al. 2022, Appendix B, Fig. A1: the cycle must match the run), nor has a WSD run in its stable phase
    (Hägele et al. 2024, Sec. 3). The end of every run that anneals to its own D is valid: a size trained to several D
    (on several IsoFLOP budget lines, a ladder's branches, a grid) gives one curve through those ends."""
    runs = usable(df)
    runs = runs[runs["schedule"].fillna("") != "constant"] if "schedule" in runs else runs
    return pd.DataFrame({"run": [f"N={n:.6g}" for n in runs["N"]], "N": runs["N"].to_numpy(float),
                         "C": runs["C"].to_numpy(float), "D": runs["D"].to_numpy(float),
                         "loss": runs["loss"].to_numpy(float)}).sort_values(["run", "C"], ignore_index=True)


# --------------------------------------------------------------------------------------------------------------------
# CSV with user-named columns
# --------------------------------------------------------------------------------------------------------------------
def load_csv(path: str | Path, *, N: str, D: str, loss: str, C: str | None = None, name: str | None = None,
             dropna: bool = False, c_convention: str | None = None) -> pd.DataFrame:
    """Any CSV: the user names the columns. Without `C`, C = 6 N D (Kaplan et al. eq. 2.1, through
    scaling.accounting) and `c_convention` may only be "6ND". With `C`, that column is also the IsoFLOP budget that
    groups runs for Approach 2, in the convention `c_convention` names, else the CSV's own `C_convention` column,
    else "column <C>" (as given: a published table's C is whatever its authors counted). No conversion happens here:
    a collected runs.csv, which carries every convention, converts through `load_runs_csv`."""
    if c_convention == OWN:
        c_convention = None
    if c_convention is not None and c_convention not in C_CONVENTIONS:
        raise ValueError(f"C convention {c_convention!r} is unknown; use one of {list(C_CONVENTIONS)}")
    if not C and c_convention not in (None, "6ND"):
        raise ValueError(f"--c-convention {c_convention}: without --C the CSV's C is computed as 6ND from N and D; "
                         f"name the column holding C under {c_convention} with --C, or give a collected runs.csv "
                         "(all conventions) without --C")
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
        own = own_convention(raw.to_dict("records"), str(p)) if "C_convention" in raw.columns else None
        if c_convention and own and c_convention != own:
            raise ValueError(f"CSV {str(p)!r}: --c-convention {c_convention} but its C_convention column says {own}; "
                             f"drop the flag (column {C!r} is read as {own}), or give the collected runs.csv without "
                             "--C to convert")
        label = c_convention or own or f"column {C}"
    else:
        out["C"] = C_under("6ND", {}, out["N"], out["D"])
        label = "6ND"
    out["name"] = raw[name].astype(str) if name else [f"row{i}" for i in range(len(out))]
    out["status"], out["reason"] = "completed", ""
    return _finish(out.to_dict("records"), "csv", label)


# --------------------------------------------------------------------------------------------------------------------
# wandb: offline run files (no server) and the public API (a server)
# --------------------------------------------------------------------------------------------------------------------
ANALYSIS_JOB = "analysis"  # the job_type of the run `analysis report --wandb` writes (analysis.report.wandb_report)
WANDB_STATUS = {"finished": "completed", "crashed": "failed", "failed": "failed", "killed": "failed",
                "running": "running"}
# Where a summary key is absent, the run's config (scaling.config.to_dict, nested) still says how it was budgeted.
CONFIG_FALLBACK = {"budget": "train.flops", "budget_convention": "train.flops_convention",
                   "C_convention": "train.flops_convention"}


def _lookup(d: dict, key: str):
    """d[key], else the dotted path ("train.flops") through nested dicts; None when absent."""
    if key in d:
        return d[key]
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _wandb_row(name: str, state: str, summary: dict, config: dict, group: Any, keys: dict) -> dict:
    """A run-table row (scaling.record.COLUMNS names) from a wandb run: summary values (scaling.record.SUMMARY_KEYS, as
    the trainer writes them), else the config's."""
    def get(k):
        v = _lookup(summary, k)
        if v is None:
            v = _lookup(config, k)
        if v is None and k in CONFIG_FALLBACK:
            v = _lookup(config, CONFIG_FALLBACK[k])
        return v

    row = {"name": name, "status": str(summary.get("status") or WANDB_STATUS.get(state, state)), "sweep": group,
           "N": get(keys["N"]), "N_total": get("N_total"), "D": get(keys["D"]), "loss": get(keys["loss"]),
           "error": summary.get("error"), "diverged_step": summary.get("diverged_step"),
           "train_loss": get("train_loss"), **{k: get(k) for k in TEXT_COLUMNS}}
    if keys.get("C"):  # a user-named key: C as given, also the IsoFLOP budget, in the convention the flag names
        row.update(C=get(keys["C"]), C_convention=keys["c_label"],
                   budget=get(keys["budget"]) if keys.get("budget") else get(keys["C"]), budget_kind="flops",
                   budget_convention=keys["c_label"])
    else:
        row.update({k: get(k) for k in ("C", "C_convention", "budget", "budget_convention")},
                   **{f"C_{k}": get(f"C_{k}") for k in FLOP_CONVENTIONS})
        kind = get("budget_kind") or ("flops" if row["budget"] is not None else None)
        row["budget_kind"] = kind
        if kind != "flops":
            row["budget"] = None
    return row


def _wandb_cli() -> list[str]:
    return [sys.executable, "-m", "wandb"]


def _wandb_core() -> str | None:
    """The wandb-core binary that `wandb leet inspect` runs (wandb/bin/wandb-core, as wandb.util.get_core_path finds it),
    located without importing wandb; None when this install has none."""
    import importlib.util

    spec = importlib.util.find_spec("wandb")
    for root in (spec.submodule_search_locations or []) if spec else []:
        core = Path(root) / "bin" / "wandb-core"
        if core.is_file() and os.access(core, os.X_OK):
            return str(core)
    return None


def _leet_inspect(path: str, summary: bool, core: str | None) -> "subprocess.CompletedProcess":
    """`wandb leet inspect [--summary] --json PATH`. The Python CLI only builds wandb-core's arguments and runs it, at
    ~0.6 s of interpreter and wandb import per call (two calls per run file: 1.3 s a run); wandb-core itself reads a
    file in ~30 ms. So call it directly, with the arguments the CLI passes offline (wandb/cli/leet.py), and fall back
    to the CLI when that fails (another wandb version's flags). `core`: `_wandb_core()`, or None for the CLI only."""
    import subprocess

    flags = ["--summary", "--json"] if summary else ["--json"]
    if core is not None:
        run_file = Path(path).resolve()
        direct = subprocess.run([core, "leet", "inspect", "--no-observability", *flags, "--run-file", str(run_file),
                                 str(run_file.parent.parent)], capture_output=True, text=True, timeout=120)
        if direct.returncode == 0:
            return direct
    return subprocess.run(_wandb_cli() + ["leet", "inspect", *flags, path], capture_output=True, text=True,
                          timeout=120)


def read_wandb_file(path: str | Path) -> dict:
    """One offline run (.wandb transaction log) via `wandb leet inspect` (the reader wandb ships; no server, no
    key): {"name", "state", "summary", "config", "group", "job_type", "history": [step dicts]}."""
    import subprocess

    p, core = str(path), _wandb_core()
    try:
        summ = _leet_inspect(p, summary=True, core=core)
        recs = _leet_inspect(p, summary=False, core=core)
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
    group, job_type, history = None, None, []
    for line in recs.stdout.splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("type") == "run":
            group = r["run"].get("run_group") or group
            job_type = r["run"].get("job_type") or job_type
        elif r.get("type") == "history":
            history.append(r["history"].get("item", {}))
    return {"name": info.get("name") or info.get("run_id"), "state": info.get("state", "unknown"),
            "summary": info.get("summary") or {}, "config": info.get("config") or {}, "group": group,
            "job_type": job_type, "history": history}


def _keys(N: str, D: str, loss: str, C: str | None, budget: str | None, c_convention: str | None) -> dict:
    return {"N": N, "D": D, "loss": loss, "C": C, "budget": budget,
            "c_label": c_convention if c_convention not in (None, OWN) else f"summary {C}"}


def _wandb_table(rows: list[dict], keys: dict, n_convention: str, c_convention: str | None, where: str,
                 target: str = "loss"):
    # Column N holds the user's N key. A user-named C key is read as given (the flag, if any, names its convention);
    # otherwise C is in the convention the runs carry, or the one asked, converted per run.
    table = runs_table(rows, c=None if keys["C"] else c_convention, where=where)
    table["N_convention"] = n_convention
    return select_target(table, target)


def load_wandb_offline(path: str | Path, *, N: str = "N", D: str = "D", loss: str = "loss", C: str | None = None,
                       budget: str | None = None, n_convention: str = "wandb",
                       c_convention: str | None = None, target: str = "loss") -> pd.DataFrame:
    """Every offline run below `path` (a wandb/ folder or any parent): values from the summary, else the config.
    By default C, its convention and the planned budget are the summary's (scaling.record.SUMMARY_KEYS), so the
    table equals the one the same runs' records give; `C` names another key (read as given, also the budget)."""
    _check_target(target)
    files = sorted(Path(path).rglob("*.wandb")) if Path(path).is_dir() else [Path(path)]
    files = [f for f in files if f.is_file()]
    if not files:
        raise ValueError(f"no .wandb run file below {str(path)!r}; give the folder that wandb.init(dir=...) wrote to")
    # A resumed run continues its wandb id in a new offline-run-<time>-<id>/run-<id>.wandb: the latest file holds the
    # run's final summary (the earlier one ends where the interrupted attempt did).
    latest = {}
    for f in files:  # sorted: offline-run-<YYYYmmdd_HHMMSS> folders of one run directory in time order
        latest[(f.parent.parent, f.name)] = f
    files = sorted(latest.values())
    keys = _keys(N, D, loss, C, budget, c_convention)
    rows = []
    for f in files:
        r = read_wandb_file(f)
        if r.get("job_type") == ANALYSIS_JOB:  # `analysis report --wandb`'s own run: fits, not a training run
            continue
        rows.append(_wandb_row(r["name"], r["state"], r["summary"], r["config"], r["group"], keys)
                    | {"run_dir": str(f.parent)})
    if not rows:
        raise ValueError(f"the .wandb files below {str(path)!r} hold only analysis runs; give the folder of the "
                         "training runs")
    return _wandb_table(rows, keys, n_convention, c_convention, str(path), target)


def load_wandb_api(api: Any, path: str, *, group: str | None = None, N: str = "N", D: str = "D",
                   loss: str = "loss", C: str | None = None, budget: str | None = None,
                   c_convention: str | None = None, target: str = "loss") -> pd.DataFrame:
    """Runs of `entity/project` (optionally one group) from a `wandb.Api()`-like object (needs a server); the
    analysis runs `analysis report --wandb` adds to a group are left out."""
    _check_target(target)
    runs: Iterable = api.runs(path, filters={"group": group} if group else None)
    keys = _keys(N, D, loss, C, budget, c_convention)
    rows = [_wandb_row(r.name, r.state, dict(r.summary), dict(r.config), getattr(r, "group", None), keys)
            for r in runs if getattr(r, "job_type", None) != ANALYSIS_JOB]
    if not rows:
        raise ValueError(f"wandb project {path!r}{f' group {group!r}' if group else ''} has no runs; check the names")
    return _wandb_table(rows, keys, "wandb", c_convention, path, target)


def wandb_path(text: str) -> tuple[str, str | None]:
    """"ENTITY/PROJECT[/GROUP]" -> ("ENTITY/PROJECT", GROUP or None); one clear error for anything else."""
    parts = text.strip("/").split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise ValueError(f"--wandb {text!r} is no folder of offline runs here, nor ENTITY/PROJECT[/GROUP]: give the "
                         "folder that wandb.init(dir=...) wrote to, or e.g. --wandb my-team/scaling/isoflop-quickstart")
    return "/".join(parts[:2]), parts[2] if len(parts) == 3 else None


def wandb_api(timeout_s: int = 30) -> Any:
    """A `wandb.Api()` (reads runs from the server: needs an API key); one clear error when there is none."""
    import wandb  # slow import; only for the API

    try:
        return wandb.Api(timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - wandb raises UsageError / AuthenticationError / network errors
        raise ValueError(f"cannot open the wandb API ({type(exc).__name__}: {str(exc)[:200]}): run `wandb login` (or "
                         "set WANDB_API_KEY) on a machine that reaches the server, or read offline run files with "
                         "--wandb FOLDER") from None

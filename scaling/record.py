"""The run record: the contract between training and analysis, and its one owner (README: "The run record").

A run directory's `record.json` and a sweep's `sweep.json` are written, read, validated and turned into table rows
here and nowhere else: the trainer writes through `write_record`, `scaling.sweep.schedule.collect` and `analysis.load` read
through `read_runs`, the analysis test fixtures are built through `write_record`. JAX-free (stdlib only, plus the
JAX-free `scaling.accounting`), so the analysis package can import it.

Versions: 2 adds `schema_version`; records written before it have none and read as version 1 (same fields).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

from scaling.accounting import FLOP_CONVENTIONS

SCHEMA_VERSION = 2
RECORD_FILE = "record.json"
CONFIG_FILE = "config.json"  # the run's resolved config, beside its record
MANIFEST_FILE = "sweep.json"
STATUSES = ("running", "completed", "diverged", "failed")
FINAL = ("completed", "diverged")  # a relaunch leaves these alone: a diverged run would diverge again, bit for bit
BUDGET_KINDS = ("steps", "tokens", "flops")


class RecordError(ValueError):
    """A run record or sweep manifest that cannot be used; the message names the file, the field and the fix."""


# --------------------------------------------------------------------------------------------------------------------
# JSON: one cleaner, one atomic writer
# --------------------------------------------------------------------------------------------------------------------
def clean_json(obj: Any) -> Any:
    """Plain JSON values: NaN/inf -> None, numpy/jax scalars and 0-d (or size-1) arrays -> Python numbers, tuples ->
    lists, dict keys -> str. Anything else raises ValueError naming the value."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):  # numpy float64 included (a float subclass)
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "size", 1) == 1:  # numpy / jax scalar or one-element array (duck-typed)
        return clean_json(obj.item())
    raise ValueError(f"value {obj!r} of type {type(obj).__name__} is not JSON-serializable: "
                     "give numbers, strings, lists or dicts")


_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it), then restored
os.umask(_UMASK)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write via a temp file in the same directory, fsync, then os.replace: readers see the old file or the whole new
    one, never a partial write; the temp file is removed if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; the file gets the mode open() would give it (0666 less the umask), so records and
        # reports stay readable by whoever may read the directory
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path | str, obj: Any, *, indent: int = 2) -> None:
    """`obj` through `clean_json`, written atomically as indented JSON."""
    try:
        text = json.dumps(clean_json(obj), indent=indent) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot write {path}: {e}") from None
    write_text_atomic(path, text)


def git_commit(path: Path | str | None = None) -> Optional[str]:
    """HEAD of the git checkout whose tracked files include `path` (default: this module); None otherwise.

    Tracked, not merely inside: a wheel installed into a venv that sits (git-ignored) in some other repository must not
    stamp that repository's commit on its runs.
    """
    target = Path(path) if path is not None else Path(__file__).resolve()
    cwd = target if target.is_dir() else target.parent
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(target)], cwd=cwd, capture_output=True,
                                 text=True, timeout=5)
        if tracked.returncode != 0:
            return None
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


# --------------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------------
# The packages whose versions every record carries (what a rerun needs to reproduce it).
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tiktoken", "wandb", "hydra-core", "numpy")


def package_versions(packages: Iterable[str] = VERSIONED_PACKAGES) -> dict:
    """{package: installed version or None}."""
    from importlib import metadata

    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()


def _is_conventions(v: Any) -> bool:
    return isinstance(v, dict) and all(_is_number(v.get(c)) for c in FLOP_CONVENTIONS)


def _is_budget(v: Any) -> bool:
    if not (isinstance(v, dict) and v.get("kind") in BUDGET_KINDS and _is_number(v.get("value"))):
        return False
    conv = v.get("convention")  # the FLOP convention of a flops budget; steps and tokens budgets have none
    return conv in FLOP_CONVENTIONS if v["kind"] == "flops" else conv is None or conv in FLOP_CONVENTIONS


# field -> (check, what it must be). A failed or running run may have loss None; a completed one needs a number.
REQUIRED: dict[str, tuple[Any, str]] = {
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "status": (lambda v: v in STATUSES, f"one of {', '.join(STATUSES)}"),
    "N": (_is_number, "a number (non-embedding parameters)"),
    "N_total": (_is_number, "a number (all parameters)"),
    "D": (_is_number, "a number (training tokens)"),
    "steps": (_is_int, "an integer"),
    "C": (_is_number, "a number (training FLOPs under C_convention)"),
    "C_convention": (lambda v: v in FLOP_CONVENTIONS, f"one of {', '.join(FLOP_CONVENTIONS)}"),
    "flops_per_token": (_is_conventions, f"an object with a number for each of {', '.join(FLOP_CONVENTIONS)}"),
    "budget": (_is_budget, "an object {kind: steps|tokens|flops, value: number, convention: a FLOP convention for "
                           "flops, else null}"),
    "loss": (lambda v: v is None or _is_number(v), "a number or null"),
    "model": (lambda v: isinstance(v, dict), "an object (the model config)"),
    "optim": (lambda v: isinstance(v, dict), "an object (the optimizer config)"),
    "seed": (_is_int, "an integer"),
}


# Optional fields (records written before them lack them), checked when present. Bits per byte / character of the
# validation text (`text_metrics`) are null where the tokens have no text (synthetic data) or the run has no loss.
OPTIONAL: dict[str, tuple[Any, str]] = {
    k: (lambda v: v is None or _is_number(v) and v > 0, "a positive number or null")
    for k in ("bytes_per_token", "chars_per_token", "bpb", "bits_per_char")
}


def validate_record(rec: Any, path: Path | str) -> dict:
    """`rec` if it is a run record this code reads, else RecordError naming `path`, the field and the fix.

    A record without `schema_version` is version 1 (written before the field existed): it is read when it has the
    required fields, and marked `schema_version: 1` in memory.
    """
    if not isinstance(rec, dict):
        raise RecordError(f"{path} is not a run record: it holds a JSON {type(rec).__name__}, not an object; rerun "
                          "that run (delete the file and relaunch)")
    version = rec.get("schema_version", 1)
    if not _is_int(version) or version < 1:
        raise RecordError(f"{path}: field 'schema_version' is {version!r}, not a positive integer; rerun that run "
                          "(delete record.json and relaunch)")
    if version > SCHEMA_VERSION:
        raise RecordError(f"{path}: field 'schema_version' is {version}, newer than this code reads "
                          f"({SCHEMA_VERSION}); update the scaling package (git pull, or pip install -U) to read it")
    if version == 1 and "loss" not in rec and rec.get("status") in ("failed", "running"):
        rec = {**rec, "loss": None}  # version 1 wrote no loss for a run that failed before its evaluation
    if rec.get("status") == "failed" and rec.get("phase") == "start":
        # A run that failed before it started (a bad config value): no shape or budget to record, only why.
        for field in ("name", "error"):
            if not (isinstance(rec.get(field), str) and rec[field]):
                raise RecordError(f"{path}: field {field!r} of a failed-start record must be a non-empty string")
        return rec if "schema_version" in rec else {**rec, "schema_version": version}
    for field, (ok, what) in REQUIRED.items():
        if field not in rec:
            if version < SCHEMA_VERSION:
                raise RecordError(f"{path}: record of an older format (schema_version {version}) lacks field "
                                  f"{field!r}: rerun that run (delete record.json and relaunch) or add the field")
            raise RecordError(f"{path}: field {field!r} is missing; rerun that run (delete record.json and relaunch)")
        if not ok(rec[field]):
            raise RecordError(f"{path}: field {field!r} is {rec[field]!r}, expected {what}; rerun that run "
                              "(delete record.json and relaunch)")
    for field, (ok, what) in OPTIONAL.items():
        if field in rec and not ok(rec[field]):
            raise RecordError(f"{path}: field {field!r} is {rec[field]!r}, expected {what}; rerun that run "
                              "(delete record.json and relaunch) or delete the field")
    if rec["status"] == "completed" and rec["loss"] is None:
        raise RecordError(f"{path}: field 'loss' is null but status is completed; a completed run has a final "
                          "validation loss: rerun that run (delete record.json and relaunch)")
    if rec.get("eval") is not None:
        _check_eval(rec["eval"], path)
    return rec if "schema_version" in rec else {**rec, "schema_version": version}


# Optional `eval`: downstream task scores (scaling.eval), {task: {field: value}}; flattened in the run table as
# eval_<task>_<column> (EVAL_COLUMNS: record field -> column suffix).
EVAL_FIELDS: dict[str, tuple[Any, str]] = {
    "accuracy": (_is_number, "a number"),
    "accuracy_norm": (lambda v: v is None or _is_number(v), "a number or null (exact-match tasks)"),
    "logprob": (lambda v: v is None or _is_number(v), "a number (nats) or null"),
    "n": (_is_int, "an integer"),
    "k": (_is_int, "an integer"),
    "chance": (_is_number, "a number"),
    "kind": (lambda v: v in ("mc", "exact"), "mc or exact"),
}
EVAL_COLUMNS = {"accuracy": "acc", "accuracy_norm": "acc_norm", "logprob": "logprob", "chance": "chance"}


def _check_eval(ev: Any, path: Path | str) -> None:
    fix = "re-evaluate the run (python -m scaling.evaluate RUN_DIR) or delete the field"
    if not isinstance(ev, dict):
        raise RecordError(f"{path}: field 'eval' is {ev!r}, expected an object {{task: scores}}; {fix}")
    for task, scores in ev.items():
        if not isinstance(scores, dict):
            raise RecordError(f"{path}: field 'eval.{task}' is {scores!r}, expected an object of scores; {fix}")
        for name, (ok, what) in EVAL_FIELDS.items():
            if name not in scores or not ok(scores[name]):
                got = "missing" if name not in scores else repr(scores[name])
                raise RecordError(f"{path}: field 'eval.{task}.{name}' is {got}, expected {what}; {fix}")


def eval_columns(ev: Optional[dict]) -> dict:
    """The record's `eval` as flat run-table columns: eval_<task>_acc, _acc_norm, _logprob, _chance."""
    return {f"eval_{task}_{col}": scores.get(name) for task, scores in (ev or {}).items()
            for name, col in EVAL_COLUMNS.items()}


def text_metrics(loss: Optional[float], bytes_per_token: Optional[float],
                 chars_per_token: Optional[float]) -> dict:
    """The record's text-normalised losses. A loss in nats per token over text of `bytes_per_token` UTF-8 bytes per
    token is loss / ln 2 / bytes_per_token bits per byte (Gao et al. 2020, The Pile, sec. 4: BPB = (L_T / L_B)
    loss / ln 2; Radford et al. 2019 report bits per character the same way): runs whose tokenizers cut the same
    text into different tokens compare in it. None where a factor is missing or the loss is not finite."""
    def per(unit: Optional[float]) -> Optional[float]:
        ok = _is_number(loss) and math.isfinite(loss) and _is_number(unit) and unit > 0
        return loss / math.log(2) / unit if ok else None

    return {"bytes_per_token": bytes_per_token, "chars_per_token": chars_per_token, "bpb": per(bytes_per_token),
            "bits_per_char": per(chars_per_token)}


def failed_start_record(name: str, error: str) -> dict:
    """The record of a run refused before it started (its config did not validate): `collect` and the report list it
    as failed with its error, and a corrected relaunch starts it afresh (failed is not final)."""
    return {"name": name, "status": "failed", "phase": "start", "error": error, "loss": None}


def write_record(run_dir: Path | str, rec: dict) -> dict:
    """Stamp `schema_version`, clean (NaN -> null), validate and write run_dir/record.json atomically; returns what
    was written. A run that did not complete and has no `loss` yet gets `loss: null` (a failure must always be able to
    write its record)."""
    path = Path(run_dir) / RECORD_FILE
    if "loss" not in rec and rec.get("status") != "completed":
        rec = {**rec, "loss": None}
    try:
        out = clean_json({**rec, "schema_version": SCHEMA_VERSION})
    except ValueError as e:
        raise RecordError(f"{path}: cannot write the record: {e}") from None
    validate_record(out, path)
    write_json_atomic(path, out)
    return out


def _record_path(run_dir_or_path: Path | str) -> Path:
    p = Path(run_dir_or_path)
    return p / RECORD_FILE if p.is_dir() else p


def _read_json(path: Path, what: str, fix: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"{path} is not a readable {what} (cannot read it: {e}); {fix}") from None
    if not text.strip():
        raise RecordError(f"{path} is not a readable {what} (the file is empty); {fix}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{path} is not a readable {what} (not valid JSON, truncated? {e}); {fix}") from None


def read_record(run_dir_or_path: Path | str) -> dict:
    """The validated record of a run directory (or of a record.json path); FileNotFoundError when there is none."""
    path = _record_path(run_dir_or_path)
    rec = _read_json(path, "run record", "rerun that run (delete record.json and relaunch)")
    if isinstance(rec, dict):
        rec = clean_json(rec)  # a NaN token some version-1 writers left reads as null, as write_record writes it
    return validate_record(rec, path)


def record_status(run_dir: Path | str) -> Optional[str]:
    """The status in run_dir/record.json; None when there is none; "corrupt" when it is unreadable or invalid (a
    relaunch retrains it)."""
    try:
        return read_record(run_dir)["status"]
    except FileNotFoundError:
        return None
    except RecordError:
        return "corrupt"


# --------------------------------------------------------------------------------------------------------------------
# The run table: one row per run (what `collect` writes to runs.csv and `analysis.load` reads)
# --------------------------------------------------------------------------------------------------------------------
# `budget` is the nominal IsoFLOP budget (FLOPs, NaN for step/token budgets), in the convention `budget_convention`.
COLUMNS = [
    "name", "status", "sweep", "budget", "budget_kind", "N", "N_total", "N_embedding", "D", "steps", "batch_size",
    "seq_len", "tokens_per_step", "C", "C_convention", "C_6N", "C_kaplan", "C_chinchilla", "loss", "train_loss",
    "epochs", "d_model", "n_layers", "n_heads", "d_ff", "vocab_size", "lr", "schedule", "warmup_fraction", "seed",
    "tokens_per_s", "mfu", "wall_s", "compile_s", "device_kind", "error", "diverged_step", "git_commit", "run_dir",
    "schema_version", "budget_convention", "role", "parent", "branch_step", "C_spent",
    "bytes_per_token", "chars_per_token", "bpb", "bits_per_char",  # null in records written before them
]


def record_row(rec: dict, run_dir: Path | str) -> dict:
    """One run-table row (COLUMNS) from a validated record."""
    budget = rec.get("budget") or {}
    flops = budget.get("kind") == "flops"
    model, optim = rec.get("model") or {}, rec.get("optim") or {}
    fpt, D = rec.get("flops_per_token") or {}, rec.get("D")
    row = {k: rec.get(k) for k in COLUMNS}
    for conv in FLOP_CONVENTIONS:  # version-1 records carry C_<conv>; computed from flops_per_token otherwise
        if row[f"C_{conv}"] is None and _is_number(fpt.get(conv)) and _is_number(D):
            row[f"C_{conv}"] = float(fpt[conv]) * D
    row.update(
        name=rec.get("name") or Path(run_dir).name,
        budget=budget.get("value") if flops else math.nan,
        budget_kind=budget.get("kind"),
        budget_convention=budget.get("convention") if flops else None,
        d_model=model.get("d_model"), n_layers=model.get("n_layers"), n_heads=model.get("n_heads"),
        d_ff=model.get("d_ff") or (4 * model["d_model"] if model.get("d_model") else None),
        vocab_size=model.get("vocab_size"), lr=optim.get("lr"), schedule=optim.get("schedule"),
        warmup_fraction=optim.get("warmup_fraction"), run_dir=str(run_dir),
        schema_version=rec.get("schema_version", 1),
        # A ladder branch shares its parent's steps up to branch_step: its C is the whole trajectory's (a point of
        # the law), C_spent what the run trained itself (a sweep's cost). Records before ladders: C_spent = C.
        # role: a ladder's "parent" (stable phase only: its loss is no point of a law) or "branch"; else null
        role="branch" if rec.get("branch") else "parent" if rec.get("branch_points") else None,
        parent=(rec.get("branch") or {}).get("parent"), branch_step=(rec.get("branch") or {}).get("step"),
        C_spent=rec.get("C_spent", rec.get("C")),
    )
    row.update(eval_columns(rec.get("eval")))  # after COLUMNS: a run's own tasks (collect keeps them)
    return row


# The wandb summary of each run: what `analysis.load.load_wandb_*` reads back (the same names as the run table).
SUMMARY_KEYS = ("N", "N_total", "D", "C", "C_convention", "C_6N", "C_kaplan", "C_chinchilla", "budget", "budget_kind",
                "budget_convention", "loss", "train_loss", "status", "error", "diverged_step", "tokens_per_s", "mfu",
                "bpb", "bits_per_char", "bytes_per_token", "chars_per_token")


def summary_fields(rec: dict) -> dict:
    """The record's SUMMARY_KEYS (and eval columns) for a wandb run's summary, leaving out what it does not have yet
    (null, NaN)."""
    keys = (*SUMMARY_KEYS, *eval_columns(rec.get("eval")))
    row = clean_json({k: v for k, v in record_row(rec, "").items() if k in keys})
    return {k: row[k] for k in keys if row.get(k) is not None}


def extra_columns(rows: Iterable[dict]) -> list[str]:
    """Columns of run-table rows beyond COLUMNS (eval_<task>_*), in first-seen order: `collect` keeps them."""
    return list(dict.fromkeys(k for r in rows for k in r if k not in COLUMNS))


# --------------------------------------------------------------------------------------------------------------------
# The sweep manifest (sweep.json): which runs were planned
# --------------------------------------------------------------------------------------------------------------------
def write_manifest(sweep_dir: Path | str, content: dict) -> None:
    path = Path(sweep_dir) / MANIFEST_FILE
    _check_manifest(clean_json(content), path)
    write_json_atomic(path, content)


def _check_manifest(m: Any, path: Path) -> dict:
    fix = "relaunch the sweep to rewrite it"
    if not isinstance(m, dict):
        raise RecordError(f"{path} is not a readable sweep manifest (a JSON {type(m).__name__}, not an object); {fix}")
    planned = m.get("planned")
    if not isinstance(planned, list):
        raise RecordError(f"{path}: field 'planned' is {'missing' if planned is None else repr(planned)[:60]}, "
                          f"expected a list of planned runs; {fix}")
    for i, p in enumerate(planned):
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise RecordError(f"{path}: field 'planned[{i}]' is {repr(p)[:80]}, expected an object with a 'name'; "
                              f"{fix}")
    return m


def read_manifest(sweep_dir: Path | str) -> Optional[dict]:
    """The validated sweep.json of `sweep_dir`, None when there is none."""
    path = Path(sweep_dir) / MANIFEST_FILE
    try:
        m = _read_json(path, "sweep manifest", "relaunch the sweep to rewrite it")
    except FileNotFoundError:
        return None
    return _check_manifest(m, path)


def missing_rows(manifest: Optional[dict], found_names: Iterable[str]) -> list[dict]:
    """A status-"missing" row per run planned in the manifest without a record (as planned: budget, N, D, ...)."""
    if not manifest:
        return []
    found = set(found_names)
    conv = manifest.get("convention")
    rows = []
    for p in manifest["planned"]:
        if p["name"] in found:
            continue
        row = dict.fromkeys(COLUMNS)
        row.update({k: p.get(k) for k in ("N", "D", "steps", "d_model", "n_layers", "n_heads", "lr", "seed")},
                   name=p["name"], status="missing", budget=p.get("budget", math.nan), sweep=manifest.get("name"),
                   budget_kind="flops" if p.get("budget") is not None else None,
                   budget_convention=conv if p.get("budget") is not None else None)
        rows.append(row)
    return rows


def read_runs(sweep_dir: Path | str, skip_corrupt: bool = False) -> list[dict]:
    """Every record.json below `sweep_dir` (any depth) as a run-table row, then a "missing" row per planned run
    without one. A corrupt record raises RecordError, or is a status-"corrupt" row when `skip_corrupt`."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise RecordError(f"sweep directory {str(root)!r} does not exist: give the folder that holds the run "
                          "directories")
    rows = []
    for path in sorted(root.rglob(RECORD_FILE)):
        try:
            rows.append(record_row(read_record(path), path.parent))
        except RecordError as e:
            if not skip_corrupt:
                raise RecordError(f"{e}; or pass --skip-corrupt (skip_corrupt=True) to list it as corrupt") from None
            row = dict.fromkeys(COLUMNS)
            row.update(name=path.parent.name, status="corrupt", error=str(e), run_dir=str(path.parent))
            rows.append(row)
    rows += missing_rows(read_manifest(root), (r["name"] for r in rows))
    if not rows:
        raise RecordError(f"sweep directory {str(root)!r} holds no record.json and no sweep.json: point at a sweep's "
                          "folder")
    return rows

"""Experiment tracking: metrics.jsonl (always) + optional Weights & Biases, and a progress display.
JSON cleaning and atomic writes are scaling.record's (`write_json_atomic` is re-exported here).

Files in ``run_dir``: ``metrics.jsonl`` (one ``{"step": s, ...}`` object per line), ``wandb_id``
(the W&B run id, reused on resume) and ``wandb/`` (W&B's own run directories).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from scaling.record import clean_json, write_json_atomic, write_text_atomic  # noqa: F401 (write_json_atomic: re-export)

BACKENDS = ("wandb", "jsonl", "none")
WANDB_MODES = ("online", "offline", "disabled")
PROGRESS = ("auto", "bar", "lines", "none")
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id"


@dataclass
class LoggingConfig:
    backend: str = "wandb"  # "wandb" | "jsonl" | "none": metrics.jsonl is always written, wandb is extra
    wandb_mode: str = "offline"  # "online" | "offline" | "disabled"
    project: str = "scaling"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None
    log_every: int = 10
    progress: str = "auto"  # "auto" (bar on a TTY, else lines) | "bar" | "lines" | "none"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"logging.{name}={getattr(self, name)!r} is invalid: {fix}")

        if self.backend not in BACKENDS:
            raise bad("backend", f"choose one of {', '.join(BACKENDS)}")
        if self.wandb_mode not in WANDB_MODES:
            raise bad("wandb_mode", f"choose one of {', '.join(WANDB_MODES)}")
        if not isinstance(self.project, str) or not self.project.strip():
            raise bad("project", "give a non-empty W&B project name, e.g. logging.project=scaling")
        if not isinstance(self.tags, (list, tuple)) or not all(isinstance(t, str) for t in self.tags):
            raise bad("tags", "give a list of strings, e.g. logging.tags=[sweep1,small]")
        if isinstance(self.log_every, bool) or not isinstance(self.log_every, int) or self.log_every < 1:
            raise bad("log_every", "use a positive integer number of steps, e.g. logging.log_every=10")
        if self.progress not in PROGRESS:
            raise bad("progress", f"choose one of {', '.join(PROGRESS)}")


class WandbUnavailableError(RuntimeError):
    """wandb online mode cannot reach its server or has no API key."""


# ------------------------------------------------------------------------------------------------
# Files


def _parse_metrics(path: Path) -> tuple[list[dict], str | None]:
    """Rows of a metrics file and, if present, the unterminated last line a crash left behind."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    partial = lines.pop() or None  # text after the final newline: '' when the file ends cleanly
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i} is not valid JSON ({e.msg}): fix or delete that line") from None
        if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{i} has no integer 'step' field: every line must be {{\"step\": int, ...}}")
        rows.append(row)
    return rows, partial


def read_metrics(path: Path) -> list[dict]:
    """All rows of a metrics.jsonl; an unterminated last line (a crash mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file {path} does not exist: check the run directory (it is written by training)")
    rows, partial = _parse_metrics(path)
    if partial is not None:
        warnings.warn(f"{path}: ignoring unterminated last line {partial[:60]!r} (interrupted write)", stacklevel=2)
    if not rows:
        raise ValueError(f"metrics file {path} holds no rows: the run logged nothing (check logging.log_every)")
    return rows


def truncate_metrics(path: Path, keep_through_step: int) -> int:
    """Atomically keep only rows with ``step <= keep_through_step``; returns how many rows remain."""
    path = Path(path)
    if not path.exists():
        return 0
    rows, _ = _parse_metrics(path)
    kept = [r for r in rows if r["step"] <= keep_through_step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(kept)


# ------------------------------------------------------------------------------------------------
# Tracker


class Tracker:
    """Appends metrics to ``metrics.jsonl`` and mirrors them to a wandb run when one is given."""

    def __init__(self, run_dir: Path, wandb_run: Any = None) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.wandb_run = wandb_run
        self.summary_values: dict[str, Any] = {}
        self._file: IO[str] | None = open(self.metrics_path, "a", encoding="utf-8")

    @property
    def run_id(self) -> str | None:
        return getattr(self.wandb_run, "id", None)

    def log(self, metrics: dict, step: int) -> None:
        if self._file is None:
            raise RuntimeError("Tracker.log() called after finish()")
        row = {"step": int(step), **clean_json(dict(metrics))}
        # One write + flush per line: a crash loses at most the line being written.
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

    def summary(self, values: dict) -> None:
        values = clean_json(dict(values))
        self.summary_values.update(values)
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def finish(self, status: str) -> None:
        """Close files and the wandb run; wandb exit code 0 iff ``status == "completed"``. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            run.summary["status"] = status
            run.finish(exit_code=0 if status == "completed" else 1)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.finish("completed" if exc_type is None else "failed")


def _check_wandb_server(base_url: str, timeout_s: float = 5.0) -> None:
    """Fail fast instead of waiting out wandb's 90 s init timeout when the server is unreachable."""
    u = urlparse(base_url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise WandbUnavailableError(
            f"logging.wandb_mode='online' but the W&B server {base_url} is unreachable ({e}): "
            "use logging.wandb_mode=offline (sync later with `wandb sync`) or logging.backend=jsonl"
        ) from None


def _init_wandb(cfg: LoggingConfig, run_dir: Path, config: dict, name: str, run_id: str | None) -> Any:
    import wandb  # slow import; only when the wandb backend is used

    if cfg.wandb_mode == "online":
        # Env first: wandb.setup() settings are a process-wide singleton and may predate the env.
        _check_wandb_server(os.environ.get("WANDB_BASE_URL") or wandb.setup().settings.base_url)
    try:
        return wandb.init(
            dir=str(run_dir),
            mode=cfg.wandb_mode,
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags),
            name=name,
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
            reinit="create_new",  # a vmapped group holds one wandb run per model, all open at once
        )
    except wandb.Error as e:
        if cfg.wandb_mode != "online":
            raise
        raise WandbUnavailableError(
            f"logging.wandb_mode='online' failed to start a W&B run ({type(e).__name__}: {e}): run `wandb login`, "
            "or use logging.wandb_mode=offline (sync later with `wandb sync`) or logging.backend=jsonl"
        ) from None


def build_tracker(
    cfg: LoggingConfig, run_dir: Path, config: dict, run_name: str, resume_step: int | None
) -> Tracker:
    """Open the run's tracker. ``resume_step``: the checkpoint step training resumes from (None for a
    fresh start), so metrics logged after it by the interrupted attempt are dropped and the wandb
    run id stored in ``run_dir/wandb_id`` is continued."""
    cfg.validate()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / METRICS_FILE
    id_path = run_dir / WANDB_ID_FILE
    if resume_step is None:
        # Fresh start: an earlier attempt that never checkpointed leaves nothing to continue.
        write_text_atomic(metrics_path, "")
        run_id = None
    else:
        if isinstance(resume_step, bool) or not isinstance(resume_step, int) or resume_step < 0:
            raise ValueError(f"resume_step={resume_step!r} is invalid: pass the restored checkpoint step or None")
        truncate_metrics(metrics_path, resume_step)
        run_id = id_path.read_text().strip() if id_path.is_file() else None
        run_id = run_id or None
    wandb_run = None
    if cfg.backend == "wandb" and cfg.wandb_mode != "disabled":
        wandb_run = _init_wandb(cfg, run_dir, config, cfg.name or run_name, run_id)
        write_text_atomic(id_path, wandb_run.id + "\n")
    return Tracker(run_dir, wandb_run)


# ------------------------------------------------------------------------------------------------
# Progress display


def _fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def _fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """A tqdm bar (loss, tokens/s, ETA) or a plain line every ``log_every`` steps."""

    def __init__(self, cfg: LoggingConfig, total_steps: int, start_step: int = 0, stream: IO[str] | None = None):
        self.stream = stream if stream is not None else sys.stderr
        mode = cfg.progress
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode, self.every, self.total, self.start = mode, cfg.log_every, int(total_steps), int(start_step)
        self._t0 = time.monotonic()
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.start, file=self.stream, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float | None = None) -> None:
        """Report that ``step`` (1-based count of completed steps) finished with ``loss``."""
        if self.mode == "none":
            return
        loss = float(loss)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            post = {"loss": f"{loss:.4f}"}
            if tokens_per_s is not None:
                post["tok/s"] = _fmt_count(tokens_per_s)
            self._bar.set_postfix(post, refresh=False)
            return
        if step % self.every and step != self.total:
            return
        done = step - self.start
        elapsed = time.monotonic() - self._t0
        eta = (self.total - step) * elapsed / done if done > 0 else float("nan")
        parts = [f"step {step}/{self.total} ({100.0 * step / max(self.total, 1):.1f}%)", f"loss {loss:.4f}"]
        if tokens_per_s is not None:
            parts.append(f"{_fmt_count(tokens_per_s)} tok/s")
        parts.append(f"eta {_fmt_duration(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

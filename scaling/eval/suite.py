"""Evaluating a model on a list of tasks, and a run directory from its newest checkpoint into its record.

`EvalSuite` builds and encodes the tasks once (every bad input fails here, before a training run's first step), then
scores any params of that model; the training loop uses it at its end (and at evaluation steps), `evaluate_run` is
what `python -m scaling.evaluate RUN_DIR` does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from scaling.eval.score import encode_rows, score_encoded
from scaling.eval.tasks import EvalConfig, HeldOut, Task, build_task, task_spec
from scaling.model.decoder import ModelConfig
from scaling.record import eval_columns, read_record, summary_fields, write_record

log = logging.getLogger("scaling.eval")


class EvalSuite:
    """The tasks of an `EvalConfig`, built from a run's data and encoded for its model."""

    def __init__(self, cfg: EvalConfig, model: ModelConfig, data: Any, cache_dir: Optional[Path] = None) -> None:
        self.model = model
        needs_text = any(task_spec(t).needs_text for t in cfg.tasks)
        held_out = HeldOut.from_tokens(data) if needs_text else None
        self.tasks: list[Task] = [build_task(t, held_out, cfg.seed, cfg.shots, cfg.limit, cache_dir)
                                  for t in cfg.tasks]
        self.rows = [encode_rows(t, data.tokenizer, model.seq_len) for t in self.tasks]

    def __call__(self, params: Any) -> dict[str, dict]:
        """The record's `eval`: {task: {accuracy, accuracy_norm, logprob, n, k, chance, kind}}."""
        return {t.name: score_encoded(self.model, params, t, rows) for t, rows in zip(self.tasks, self.rows)}


def evaluate_run(run_dir: Path, cfg: EvalConfig) -> dict:
    """Scores the run's newest checkpoint on `cfg.tasks`, merges the scores into record.json's `eval` (atomically,
    keeping every other field and earlier tasks) and into the run's wandb summary; returns the record."""
    from scaling.data.tokens import load_tokens
    from scaling.eval.sample import check_run_tokenizer, load_run_checkpoint

    run_dir = Path(run_dir)
    if not cfg.tasks:
        raise ValueError("no task to evaluate: give --tasks (e.g. --tasks offline)")
    run_cfg, params, step = load_run_checkpoint(run_dir)
    try:
        record = read_record(run_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir}/record.json not found: the run has not finished (its record is written "
                                "at the end); let it finish, or relaunch it to write its record") from None
    if record["status"] == "completed" and step != record["steps"]:
        # The scores would sit in the record beside the final model's losses (and in the run table's downstream
        # columns) while they are an earlier model's.
        raise ValueError(f"{run_dir} completed at step {record['steps']} but its newest intact checkpoint is step "
                         f"{step} (a newer one is unreadable and was set aside as <step>.corrupt): its scores would "
                         "not be the final model's. Delete its record.json and relaunch the run: it resumes from "
                         f"step {step} and writes a final checkpoint and record again; then evaluate it.")
    data = load_tokens(run_cfg.data)
    check_run_tokenizer(record, data.tokenizer)
    suite = EvalSuite(cfg, run_cfg.model, data, run_cfg.data.resolved_cache_dir())
    record = write_record(run_dir, {**record, "eval": {**(record.get("eval") or {}), **suite(params)}})
    _to_wandb(run_cfg, run_dir, record)
    return record


def _to_wandb(run_cfg: Any, run_dir: Path, record: dict) -> None:
    """The run's wandb summary gets the eval columns (same names as the run table), when the run used wandb."""
    logging_cfg = run_cfg.logging
    if logging_cfg.backend != "wandb" or logging_cfg.wandb_mode == "disabled":
        return
    from scaling.config import to_dict
    from scaling.train.tracking import build_tracker

    try:
        tracker = build_tracker(logging_cfg, run_dir, to_dict(run_cfg), run_cfg.name, int(record["steps"]))
        tracker.summary({**summary_fields(record), **eval_columns(record["eval"])})
        tracker.finish(record["status"])
    except Exception as e:  # noqa: BLE001 - the record already holds the scores; wandb is a mirror
        log.warning("eval scores are in %s/record.json but not in wandb: %s: %s", run_dir, type(e).__name__, e)

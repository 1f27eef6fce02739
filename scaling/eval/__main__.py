"""`python -m scaling.evaluate RUN_DIR [--tasks cloze,kv_recall] [--shots k] [--limit n] [--seed s]`
(also `python -m scaling.eval`): score a run's newest checkpoint on downstream tasks, print a table, and write the
scores into its record.json (`eval`) and its wandb summary. Tasks: scaling/eval/tasks.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from scaling.eval.tasks import OFFLINE, TASKS, EvalConfig


def format_table(ev: dict[str, dict]) -> str:
    lines = [f"{'task':<12} {'kind':<6} {'n':>5} {'k':>3} {'chance':>7} {'acc':>7} {'acc_norm':>8} {'logprob':>9}"]
    for name, s in ev.items():
        norm = "-" if s["accuracy_norm"] is None else f"{s['accuracy_norm']:.3f}"
        lines.append(f"{name:<12} {s['kind']:<6} {s['n']:>5} {s['k']:>3} {s['chance']:>7.3f} {s['accuracy']:>7.3f} "
                     f"{norm:>8} {s['logprob']:>9.3f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scaling.evaluate", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tasks", default="offline",
                        help=f"comma-separated, among {', '.join(TASKS)}; 'offline' = {','.join(OFFLINE)}")
    parser.add_argument("--shots", type=int, default=None, help="demonstrations per example (default: the task's)")
    parser.add_argument("--limit", type=int, default=EvalConfig.limit, help="examples per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        from scaling.eval.suite import evaluate_run

        cfg = EvalConfig(tasks=args.tasks.split(","), shots=args.shots, limit=args.limit, seed=args.seed)
        record = evaluate_run(args.run_dir, cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table({t: record["eval"][t] for t in cfg.tasks}))
    print(f"wrote eval of {len(cfg.tasks)} tasks into {args.run_dir / 'record.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

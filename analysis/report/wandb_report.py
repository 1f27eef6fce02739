"""`analysis report --wandb`: a report's fit tables (wandb.Table), figures (wandb.Image) and headline numbers (the run
summary) in one wandb run of job_type "analysis" in the sweep's group, beside its training runs on the dashboard.

It reads what `analysis.report.write_report` wrote (results.json, figures/*.png), so it needs no fit of its own and
follows whatever sections the report grows. Offline unless WANDB_MODE says otherwise or an API key is configured:
`wandb sync <run dir>` uploads the run later. The loaders leave this run out of a group's training runs
(analysis.load.ANALYSIS_JOB).
"""

from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd

from analysis.load import ANALYSIS_JOB
from scaling import record as R

DEFAULT_PROJECT = "scaling"  # the trainer's logging.project default (analysis may not import scaling.train)
RESULTS, FIGURES = "results.json", "figures"


def default_mode() -> str:
    """WANDB_MODE when set; else "online" when an API key is configured (WANDB_API_KEY, or a netrc entry for the
    server `wandb login` writes), "offline" otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return "online" if host and netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def sweep_identity(source: str | Path) -> dict:
    """{"project", "entity", "group"} the sweep's training runs logged to: their config.json `logging` section (the
    sweep sets logging.group to its name), else the records' `sweep`, else the folder's name."""
    source = Path(source)
    logging: dict = {}
    if source.is_file():  # a collected runs.csv
        sweeps = pd.read_csv(source, usecols=lambda c: c == "sweep").get("sweep", pd.Series(dtype=str)).dropna()
        sweep = str(sweeps.iloc[0]) if sweeps.nunique() == 1 else None
        home = source.parent
    else:
        rows = R.read_runs(source, skip_corrupt=True)
        for row in rows:
            config = Path(row.get("run_dir") or "") / "config.json"
            if row.get("run_dir") and config.is_file():
                logging = json.loads(config.read_text()).get("logging") or {}
                break
        sweeps = {r.get("sweep") for r in rows if r.get("sweep")}
        sweep = sweeps.pop() if len(sweeps) == 1 else None
        home = source
    return {"project": logging.get("project") or DEFAULT_PROJECT, "entity": logging.get("entity"),
            "group": logging.get("group") or sweep or home.resolve().name}


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, int, float))


def _cell(v: Any) -> Any:
    return v if _scalar(v) else json.dumps(v)  # a nested value in a table cell: its JSON text


def flatten(res: dict) -> tuple[dict, pd.DataFrame, dict[str, pd.DataFrame]]:
    """results.json -> (summary: "section/symbol" -> number or text, the fits table: one row per fitted number with its
    95% interval, other tables: each list of records, e.g. "approach2/minima", "excluded")."""
    summary: dict = {}
    rows: list[dict] = []
    tables: dict[str, pd.DataFrame] = {}

    def walk(prefix: str, d: dict) -> None:
        ci = d.get("ci95") if isinstance(d.get("ci95"), dict) else {}
        for k, v in d.items():
            name = f"{prefix}/{k}" if prefix else str(k)
            if k == "ci95":
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if not math.isfinite(v):
                    continue
                summary[name] = v
                lo_hi = ci.get(k) if isinstance(ci.get(k), (list, tuple)) and len(ci.get(k)) == 2 else (None, None)
                if prefix:
                    rows.append({"fit": prefix, "symbol": str(k), "estimate": float(v), "ci95_low": lo_hi[0],
                                 "ci95_high": lo_hi[1]})
                    if lo_hi[0] is not None:
                        summary[f"{name}_ci95"] = list(lo_hi)
            elif isinstance(v, (str, bool)):
                summary[name] = v
            elif isinstance(v, dict):
                walk(name, v)
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                tables[name] = pd.DataFrame([{kk: _cell(vv) for kk, vv in x.items()} for x in v])

    walk("", res)
    fits = pd.DataFrame(rows, columns=["fit", "symbol", "estimate", "ci95_low", "ci95_high"])
    return summary, fits, tables


def log_report(report_dir: str | Path, source: str | Path, *, project: str | None = None, group: str | None = None,
               entity: str | None = None, mode: str | None = None) -> dict:
    """Log the report in `report_dir` (written by write_report for `source`) to one wandb run; returns {"id", "mode",
    "project", "group", "dir": the run's folder (what `wandb sync` takes)}."""
    report_dir = Path(report_dir)
    results = report_dir / RESULTS
    if not results.is_file():
        raise FileNotFoundError(f"{results} does not exist: write the report first (python -m analysis report "
                                f"{source}), then log its folder")
    res = json.loads(results.read_text())
    summary, fits, tables = flatten(res)
    where = sweep_identity(source)
    project, group, entity = project or where["project"], group or where["group"], entity or where["entity"]
    mode = mode or default_mode()

    import wandb  # slow import; only when asked

    run = wandb.init(dir=str(report_dir), project=project, entity=entity, group=group, job_type=ANALYSIS_JOB,
                     name=f"analysis-{group}", mode=mode, reinit="create_new",
                     config={"source": str(Path(source).resolve()), "conventions": res.get("conventions", {})},
                     settings=wandb.Settings(silent=True))
    try:
        logged: dict = {"tables/fits": wandb.Table(dataframe=fits, allow_mixed_types=True)}
        logged |= {f"tables/{k}": wandb.Table(dataframe=t, allow_mixed_types=True) for k, t in tables.items()}
        logged |= {f"figures/{p.stem}": wandb.Image(str(p)) for p in sorted((report_dir / FIGURES).glob("*.png"))}
        run.log(logged)
        run.summary.update(summary)
        out = {"id": run.id, "mode": mode, "project": project, "group": group, "dir": str(Path(run.dir).parent)}
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    return out

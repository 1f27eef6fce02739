import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scaling.train.tracking import (
    LoggingConfig,
    Progress,
    WandbUnavailableError,
    build_tracker,
    read_metrics,
    write_json_atomic,
)

WANDB_BIN = Path(sys.executable).parent / "wandb"


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keep wandb silent, local and away from the network and the user's home."""
    home = tmp_path / "home"
    home.mkdir()
    for k, v in {
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
        "WANDB_CONFIG_DIR": str(home / ".config" / "wandb"),
        "WANDB_CACHE_DIR": str(home / ".cache" / "wandb"),
        "WANDB_DATA_DIR": str(home / ".local" / "wandb"),
        "HOME": str(home),
        "WANDB_DISABLE_GIT": "true",
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # closed local port: any network attempt fails at once
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return tmp_path


def inspect_summary(path: Path) -> tuple[dict, str]:
    """Parse a run with wandb's own reader: (JSON summary object, plain-text summary)."""
    as_json = subprocess.run([str(WANDB_BIN), "leet", "inspect", "--summary", "--json", str(path)],
                             capture_output=True, text=True, timeout=120, check=True)
    as_text = subprocess.run([str(WANDB_BIN), "leet", "inspect", "--summary", str(path)],
                             capture_output=True, text=True, timeout=120, check=True)
    return json.loads(as_json.stdout), as_text.stdout


def run_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def test_wandb_offline_run_is_readable_and_resume_continues_same_id(wandb_env):
    run_dir = wandb_env / "run"
    cfg = LoggingConfig(backend="wandb", wandb_mode="offline", project="scaling-test", group="g1", tags=["t1"])
    config = {"model": {"n_layer": 2, "d_model": 8}, "optim": {"lr": 0.003}}
    tr = build_tracker(cfg, run_dir, config, run_name="tiny", resume_step=None)
    for s in range(1, 7):
        tr.log({"loss": np.float32(4.0 / s), "lr": 1e-3}, step=s)
    tr.finish("interrupted")
    (first,) = run_files(run_dir)
    run_id = (run_dir / "wandb_id").read_text().strip()
    summ, text = inspect_summary(first)
    assert summ["run_id"] == run_id and summ["name"] == "tiny" and summ["project"] == "scaling-test"
    assert summ["exit_code"] == 1 and summ["tags"] == ["t1"]
    assert summ["config"]["model"] == {"n_layer": 2, "d_model": 8}
    assert summ["summary"]["loss"] == pytest.approx(4.0 / 6) and summ["step"] == 6

    # Resume from a checkpoint at step 4: same id, metrics after step 4 dropped, then continued.
    tr = build_tracker(cfg, run_dir, config, run_name="tiny", resume_step=4)
    assert tr.run_id == run_id
    for s in range(5, 9):
        tr.log({"loss": 4.0 / s, "lr": 1e-3}, step=s)
    tr.summary({"N": 1234, "D": 56789, "C": 4.2e11, "final_loss": 0.5})
    tr.finish("completed")
    second = [p for p in run_files(run_dir) if p != first]
    assert len(second) == 1 and second[0].name == f"run-{run_id}.wandb"
    summ, text = inspect_summary(second[0])
    assert summ["run_id"] == run_id and summ["exit_code"] == 0 and summ["state"] == "finished"
    assert summ["summary"]["N"] == 1234 and summ["summary"]["final_loss"] == 0.5
    assert summ["summary"]["status"] == "completed"
    assert "1234" in text and "final_loss" in text and "model.n_layer" in text

    # metrics.jsonl of the resumed run equals that of an uninterrupted run.
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, 9))
    assert [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")] == pytest.approx([4.0 / s for s in range(1, 9)])


def test_fresh_start_gets_new_wandb_id_and_empty_metrics(wandb_env):
    run_dir = wandb_env / "run"
    cfg = LoggingConfig(backend="wandb", wandb_mode="offline")
    tr = build_tracker(cfg, run_dir, {}, "a", None)
    tr.log({"loss": 1.0}, 1)
    tr.finish("failed")
    first_id = (run_dir / "wandb_id").read_text().strip()
    tr = build_tracker(cfg, run_dir, {}, "a", None)  # crashed before any checkpoint -> start over
    tr.finish("completed")
    assert (run_dir / "wandb_id").read_text().strip() not in ("", first_id)
    assert (run_dir / "metrics.jsonl").read_text() == ""


def test_online_without_api_key_fails_clearly(wandb_env, monkeypatch):
    # A local listener stands in for a reachable server; wandb must stop at the missing key.
    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
        with pytest.raises(WandbUnavailableError, match=r"failed to start.*API key.*wandb_mode=offline"):
            build_tracker(LoggingConfig(wandb_mode="online"), wandb_env / "run", {}, "x", None)


def test_online_with_unreachable_server_fails_fast(wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 86)
    with pytest.raises(WandbUnavailableError, match=r"127\.0\.0\.1:9 is unreachable.*wandb_mode=offline"):
        build_tracker(LoggingConfig(wandb_mode="online"), wandb_env / "run", {}, "x", None)


@pytest.mark.parametrize("backend", ["jsonl", "none"])
def test_jsonl_backend_truncates_on_resume_and_writes_no_wandb(tmp_path, backend):
    run_dir = tmp_path / "run"
    cfg = LoggingConfig(backend=backend)
    with build_tracker(cfg, run_dir, {}, "r", None) as tr:
        for s in range(0, 50, 10):
            tr.log({"loss": 1.0 / (s + 1), "tokens": s * 512}, step=s)
    # An interrupted write leaves an unterminated last line behind.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "lo')
    with pytest.warns(UserWarning, match="unterminated"):
        assert read_metrics(run_dir / "metrics.jsonl")[-1]["step"] == 40
    with build_tracker(cfg, run_dir, {}, "r", resume_step=20) as tr:
        assert tr.run_id is None
        tr.log({"loss": 0.01, "tokens": 30 * 512}, step=30)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 10, 20, 30] and rows[-1]["loss"] == 0.01
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_id").exists()
    assert [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_write_json_atomic_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "record.json"
    write_json_atomic(path, {"status": "running", "loss": np.float64(3.5)})
    write_json_atomic(path, {"status": "completed", "N": np.int64(7), "hist": [np.float32(1.5)]})
    assert json.loads(path.read_text()) == {"status": "completed", "N": 7, "hist": [1.5]}
    with pytest.raises(ValueError, match="not JSON-serializable"):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text())["status"] == "completed"  # old content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


@pytest.mark.parametrize(
    "content,match",
    [(None, "does not exist"), ("", "holds no rows"), ('{"step": 1}\nnot json\n', r":2 is not valid JSON"),
     ('{"loss": 1.0}\n', r":1 has no integer 'step'")],
)
def test_read_metrics_bad_files(tmp_path, content, match):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_metrics(path)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"backend": "tensorboard"}, r"logging\.backend='tensorboard'"),
     ({"wandb_mode": "shared"}, r"logging\.wandb_mode='shared'"),
     ({"log_every": 0}, r"logging\.log_every=0"),
     ({"progress": "fancy"}, r"logging\.progress='fancy'"),
     ({"tags": "a,b"}, r"logging\.tags='a,b'"),
     ({"project": ""}, r"logging\.project=''")],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoggingConfig(**kwargs)


def test_progress_lines_every_log_every_and_last_step():
    out = io.StringIO()  # not a TTY: "auto" -> lines
    p = Progress(LoggingConfig(progress="auto", log_every=5), total_steps=12, stream=out)
    for s in range(1, 13):
        p.update(s, loss=10.0 / s, tokens_per_s=25_000.0)
    p.close()
    lines = out.getvalue().splitlines()
    assert [ln.split(" ")[1] for ln in lines] == ["5/12", "10/12", "12/12"]
    assert "loss 2.0000" in lines[0] and "25.0k tok/s" in lines[0] and "eta 0:00:00" in lines[2]


def test_progress_bar_and_none():
    out = io.StringIO()
    p = Progress(LoggingConfig(progress="bar"), total_steps=4, stream=out)
    for s in range(1, 5):
        p.update(s, loss=1.25, tokens_per_s=2e6)
    p.close()
    assert "4/4" in out.getvalue() and "loss=1.2500" in out.getvalue() and "tok/s=2.0M" in out.getvalue()
    quiet = io.StringIO()
    p = Progress(LoggingConfig(progress="none"), total_steps=4, stream=quiet)
    p.update(4, loss=1.0)
    p.close()
    assert quiet.getvalue() == ""

"""Loaders: sweep records, CSV with user columns, wandb offline files and a fake wandb API."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.load import load_csv, load_curves, load_sweep, load_wandb_api, load_wandb_offline, usable
from analysis.synthetic import isoflop_runs, write_sweep


@pytest.fixture
def sweep(tmp_path):
    return write_sweep(tmp_path / "sweep", isoflop_runs(budgets=(1e17, 1e18), n_per_budget=4))


def test_sweep_keeps_failed_diverged_and_missing_runs_out_of_fits(sweep):
    df = load_sweep(sweep)
    assert len(df) == 8 + 3
    bad = df[df["excluded"]].set_index("name")
    assert bad.loc["failed-0", "reason"] == "status failed: RuntimeError: out of memory"
    assert bad.loc["diverged-0", "reason"] == "status diverged: diverged at step 7"
    assert bad.loc["never-ran", "status"] == "missing"
    assert len(usable(df)) == 8 and set(usable(df)["budget"]) == {1e17, 1e18}


def test_sweep_conventions_change_N_and_C(sweep):
    non_emb = usable(load_sweep(sweep)).set_index("name")
    total = usable(load_sweep(sweep, n="total", c="chinchilla")).set_index("name")
    np.testing.assert_allclose(total["N"], non_emb["N"] * 1.1)  # the fixture's N_total = 1.1 N
    np.testing.assert_allclose(non_emb["C"], 6 * non_emb["N"] * non_emb["D"])
    np.testing.assert_allclose(total["C"], non_emb["C"] * 1.1)  # C_chinchilla from the record
    assert set(total["C_convention"]) == {"chinchilla"} and set(total["N_convention"]) == {"total"}


def test_curves_follow_metrics_and_end_at_run_C(sweep):
    cur = load_curves(sweep, loss="eval_loss")
    table = usable(load_sweep(sweep)).set_index("name")
    last = cur.groupby("run").last()
    np.testing.assert_allclose(last["C"], table.loc[last.index, "C"], rtol=1e-9)
    assert cur.groupby("run").size().eq(4).all()  # eval every 5 of 20 steps


def test_sweep_errors(tmp_path, sweep):
    with pytest.raises(ValueError, match="does not exist"):
        load_sweep(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no record.json"):
        load_sweep(tmp_path / "empty")
    rec = next(sweep.rglob("record.json"))
    rec.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON.*skip_corrupt"):
        load_sweep(sweep)
    df = load_sweep(sweep, skip_corrupt=True)
    assert df.loc[df["status"] == "corrupt", "excluded"].all()
    rec.write_text("")
    with pytest.raises(ValueError, match="file is empty"):
        load_sweep(sweep)
    with pytest.raises(ValueError, match="N convention 'embedding' is unknown"):
        load_sweep(sweep, n="embedding")


def _csv(tmp_path, text):
    p = tmp_path / "runs.csv"
    p.write_text(text)
    return p


def test_csv_with_user_columns(tmp_path):
    p = _csv(tmp_path, "params,tokens,val,budget\n1e6,1e9,3.0,6e15\n2e6,5e8,2.9,6e15\n")
    df = load_csv(p, N="params", D="tokens", loss="val")
    assert df["C"].tolist() == [6e15, 6e15] and df["budget"].isna().all() and df["C_convention"].iloc[0] == "6ND"
    df = load_csv(p, N="params", D="tokens", loss="val", C="budget")
    assert df["budget"].tolist() == [6e15, 6e15]


@pytest.mark.parametrize("text, kw, match", [
    ("params,tokens,loss\n1,2,3\n", {"N": "n_params"}, r"column 'n_params' \(for N\) not found; available"),
    ("params,tokens,loss\n1,2,\n", {}, r"1 row\(s\) have empty or non-numeric values .*'loss'.*--dropna"),
    ("params,tokens,loss\n1,-2,3\n", {}, r"column 'tokens' has non-positive value -2"),
    ("params,tokens,loss\n", {}, "has a header but no rows"),
    ("", {}, "is empty"),
])
def test_csv_errors(tmp_path, text, kw, match):
    with pytest.raises(ValueError, match=match):
        load_csv(_csv(tmp_path, text), **({"N": "params", "D": "tokens", "loss": "loss"} | kw))


def test_csv_dropna_and_missing_file(tmp_path):
    p = _csv(tmp_path, "params,tokens,loss\n1,2,3\n1,2,\n")
    assert len(load_csv(p, N="params", D="tokens", loss="loss", dropna=True)) == 1
    with pytest.raises(ValueError, match="does not exist"):
        load_csv(tmp_path / "x.csv", N="a", D="b", loss="c")


class FakeRun:
    def __init__(self, name, state, summary, config, group):
        self.name, self.state, self.summary, self.config, self.group = name, state, summary, config, group


class FakeApi:
    """The part of wandb.Api() the loader uses: runs(path, filters)."""

    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return [r for r in self._runs if not filters or r.group == filters["group"]]


def test_wandb_api_export_with_fake_api():
    api = FakeApi([FakeRun("a", "finished", {"loss": 3.1, "N": 1e6}, {"D": 1e9}, "g1"),
                   FakeRun("b", "crashed", {}, {"N": 2e6, "D": 1e9}, "g1"),
                   FakeRun("c", "finished", {"loss": 2.0, "N": 1e7, "D": 1e9}, {}, "g2")])
    df = load_wandb_api(api, "me/proj", group="g1")
    assert api.calls == [("me/proj", {"group": "g1"})]
    assert df["name"].tolist() == ["a", "b"]
    a = df.iloc[0]
    assert (a["N"], a["D"], a["loss"], a["C"], a["excluded"]) == (1e6, 1e9, 3.1, 6e15, False)  # D from config
    assert df.iloc[1]["excluded"] and df.iloc[1]["reason"] == "status failed"
    with pytest.raises(ValueError, match="has no runs"):
        load_wandb_api(api, "me/proj", group="nope")


def test_wandb_offline_run_is_read_without_server(tmp_path):
    script = f"""
import wandb
run = wandb.init(mode="offline", dir={str(tmp_path)!r}, project="p", group="isoflop-1e17", name="r1",
                 config={{"N": 1.5e6}})
for s in range(3):
    run.log({{"train_loss": 4.0 - s, "flops": 1e15 * (s + 1)}}, step=s)
run.summary["D"] = 2e9
run.summary["loss"] = 3.25
run.finish()
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=180,
                   env={"WANDB_SILENT": "true", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    df = load_wandb_offline(tmp_path)
    row = df.iloc[0]
    assert (row["name"], row["status"], row["N"], row["D"], row["loss"], row["sweep"]) == \
        ("r1", "completed", 1.5e6, 2e9, 3.25, "isoflop-1e17")
    assert not row["excluded"]
    with pytest.raises(ValueError, match="no .wandb run file"):
        load_wandb_offline(tmp_path / "elsewhere")

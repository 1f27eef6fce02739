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
    np.testing.assert_allclose(non_emb["C"], 6 * non_emb["N"] * non_emb["D"])  # the records' own: 6N
    pd.testing.assert_frame_equal(load_sweep(sweep, c="record"), load_sweep(sweep))  # "record" = the default
    six_nd = usable(load_sweep(sweep, n="total", c="6ND"))
    np.testing.assert_allclose(six_nd["C"], 6 * six_nd["N"] * six_nd["D"])  # 6 N D with the chosen (total) N
    assert set(non_emb["C_convention"]) == {"6N"} and set(six_nd["C_convention"]) == {"6ND"}
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


def _family(budgets=(1e12, 1e13, 1e14), sizes=(3e3, 1e4, 3e4, 1e5)):
    """Runs of a tiny-model family planned in the chinchilla convention (C_6N / C_chinchilla varies with N)."""
    from analysis.synthetic import chinchilla_loss

    rows = []
    for C in budgets:
        for N in sizes:
            f = 6 * N + 12 * 4096 * np.sqrt(N / 24)
            D = C / f
            rows.append({"name": f"C{C:.0e}-N{N:.0e}", "N": N, "D": D, "C": C, "budget": C, "C_6N": 6 * N * D,
                         "C_kaplan": 6.3 * N * D, "C_chinchilla": C,
                         "loss": chinchilla_loss(N, D, E=2.0, A=60.0, B=300.0, alpha=0.4, beta=0.35)})
    return pd.DataFrame(rows)


def test_mixed_conventions_are_one_clear_error_and_an_explicit_one_converts(tmp_path):
    write_sweep(tmp_path / "s" / "a", _family(budgets=(1e12,)), failed=0, diverged=0, convention="chinchilla")
    write_sweep(tmp_path / "s" / "b", _family(budgets=(1e13,)), failed=0, diverged=0, convention="6N")
    with pytest.raises(ValueError, match=r"carry different C conventions \(6N \(4 runs\), chinchilla \(4 runs\), "
                                         r"field C_convention\); pick one with "
                                         r"--c-convention 6ND\|6N\|kaplan\|chinchilla"):
        load_sweep(tmp_path / "s")
    df = usable(load_sweep(tmp_path / "s", c="chinchilla"))
    assert set(df["C_convention"]) == {"chinchilla"}
    np.testing.assert_allclose(df["C"], _family(budgets=(1e12, 1e13))["C_chinchilla"].to_numpy())
    df6 = usable(load_sweep(tmp_path / "s", c="6ND"))
    np.testing.assert_allclose(df6["C"], 6 * df6["N"] * df6["D"], rtol=1e-12)


def test_csv_convention_flag(tmp_path):
    p = _csv(tmp_path, "params,tokens,loss,flops,C_convention\n1e6,1e9,3.0,7e15,kaplan\n2e6,5e8,2.9,7e15,kaplan\n")
    assert load_csv(p, N="params", D="tokens", loss="loss", C="flops")["C_convention"].iloc[0] == "kaplan"
    df = load_csv(p, N="params", D="tokens", loss="loss", C="flops", c_convention="kaplan")
    assert df["C"].tolist() == [7e15, 7e15] and df["budget"].tolist() == [7e15, 7e15]
    with pytest.raises(ValueError, match="--c-convention chinchilla but its C_convention column says kaplan"):
        load_csv(p, N="params", D="tokens", loss="loss", C="flops", c_convention="chinchilla")
    q = _csv(tmp_path, "params,tokens,loss,flops\n1e6,1e9,3.0,7e15\n")
    assert load_csv(q, N="params", D="tokens", loss="loss", C="flops")["C_convention"].iloc[0] == "column flops"
    named = load_csv(q, N="params", D="tokens", loss="loss", C="flops", c_convention="6N")
    assert named["C_convention"].iloc[0] == "6N"
    with pytest.raises(ValueError, match="without --C the CSV's C is computed as 6ND from N and D"):
        load_csv(q, N="params", D="tokens", loss="loss", c_convention="chinchilla")
    with pytest.raises(ValueError, match="C convention 'flops' is unknown"):
        load_csv(q, N="params", D="tokens", loss="loss", C="flops", c_convention="flops")


def test_collected_runs_csv_reads_like_its_sweep(tmp_path):
    from analysis.load import is_runs_csv, load_runs_csv
    from scaling.sweep.schedule import collect, write_csv

    sweep = write_sweep(tmp_path / "s", _family(), convention="chinchilla")
    write_csv(collect(sweep), tmp_path / "runs.csv")
    assert is_runs_csv(tmp_path / "runs.csv")
    for c in (None, "6ND", "kaplan"):
        a = load_runs_csv(tmp_path / "runs.csv", c=c).set_index("name").sort_index()
        b = load_sweep(sweep, c=c).set_index("name").sort_index()
        cols = ["status", "excluded", "reason", "N", "D", "C", "loss", "budget", "budget_C", "C_convention", "lr"]
        pd.testing.assert_frame_equal(a[cols], b[cols], check_dtype=False)
    # The mix98 run table of the previous format (39 columns, no budget_convention) reads in its own convention.
    mix = load_runs_csv(Path(__file__).resolve().parents[1] / "experiments" / "mix98" / "runs.csv")
    assert len(usable(mix)) == 29 and set(mix["C_convention"]) == {"chinchilla"}
    assert (mix["budget_C"] == mix["budget"]).all()


WANDB_SCRIPT = """
import json, sys, wandb
for r in json.load(open(sys.argv[1])):
    run = wandb.init(mode="offline", dir=sys.argv[2], project="p", group="family", name=r["name"], config=r["config"])
    run.summary.update(r["summary"])
    run.finish(exit_code=0 if r["summary"]["status"] == "completed" else 1)
"""


def test_wandb_summaries_give_the_same_table_and_fit_as_the_records(tmp_path, monkeypatch):
    """Offline wandb runs whose summaries hold scaling.record.summary_fields (as the trainer logs them): the table
    and the Approach 2 fit equal the records'. Half the runs lack the budget keys (older runs): the config's
    train.flops and train.flops_convention stand in."""
    from analysis.__main__ import main
    from scaling.record import read_record, summary_fields

    # Two budgets of four sizes: about the fewest Approach 2 fits (each run costs a wandb init and CLI reads, ~3 s).
    family = _family(budgets=(1e12, 1e13))
    sweep = write_sweep(tmp_path / "s", family, failed=1, diverged=0, convention="chinchilla")
    runs = []
    for i, path in enumerate(sorted(sweep.rglob("record.json"))):
        rec = read_record(path)
        summary = summary_fields(rec)
        if i % 2:
            summary = {k: v for k, v in summary.items() if not k.startswith("budget")}
        runs.append({"name": rec["name"], "summary": summary,
                     "config": {"train": {"flops": rec["budget"]["value"], "flops_convention": "chinchilla"}}})
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    subprocess.run([sys.executable, "-c", WANDB_SCRIPT, str(tmp_path / "runs.json"), str(tmp_path / "wandb")],
                   check=True, capture_output=True, timeout=600,
                   env={"WANDB_SILENT": "true", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    cols = ["status", "excluded", "reason", "N", "D", "C", "loss", "budget", "budget_C", "C_convention"]
    for c in (None, "6N"):
        w = load_wandb_offline(tmp_path / "wandb", c_convention=c).set_index("name").sort_index()
        r = load_sweep(sweep, c=c).set_index("name").sort_index().drop(index="never-ran")
        pd.testing.assert_frame_equal(w[cols], r[cols], check_dtype=False)
    assert set(w["sweep"]) == {"family"} and w.loc["failed-0", "excluded"]
    fits = {}
    for src in (["--wandb", str(tmp_path / "wandb")], ["--sweep", str(sweep)]):
        out = tmp_path / f"{src[0][2:]}.json"
        assert main(["fit", *src, "--approach", "2", "--bootstrap", "0", "--at-C", "1e15", "--json", str(out)]) == 0
        fits[src[0]] = json.loads(out.read_text())["approach2"]
    assert "error" not in fits["--wandb"] and len(fits["--wandb"]["minima"]) >= 2
    assert fits["--wandb"] == fits["--sweep"]
    # Files are read by wandb-core directly (30 ms, not the CLI's 0.6 s of Python a call); the CLI reads the same.
    import analysis.load as L

    one = next((tmp_path / "wandb").rglob("*.wandb"))
    assert L._wandb_core() is not None
    direct = L.read_wandb_file(one)
    monkeypatch.setattr(L, "_wandb_core", lambda: None)
    assert L.read_wandb_file(one) == direct and direct["summary"]["status"] in ("completed", "failed")


def test_a_resumed_wandb_run_is_read_once_from_its_latest_file(tmp_path, monkeypatch):
    import analysis.load as L

    wandb_dir = tmp_path / "run" / "wandb"
    for stamp in ("20260101_000000", "20260101_010000"):
        d = wandb_dir / f"offline-run-{stamp}-abc"
        d.mkdir(parents=True)
        (d / "run-abc.wandb").write_bytes(b"")
    seen = []

    def fake_read(path):
        seen.append(Path(path).parent.name)
        return {"name": "r", "state": "finished", "group": "g", "history": [], "config": {},
                "summary": {"N": 1e6, "D": 1e9, "loss": 3.0, "C": 7e15, "C_convention": "chinchilla",
                            "status": "completed"}}

    monkeypatch.setattr(L, "read_wandb_file", fake_read)
    df = L.load_wandb_offline(tmp_path)
    assert len(df) == 1 and seen == ["offline-run-20260101_010000-abc"]
    assert (df["C"].iloc[0], df["C_convention"].iloc[0]) == (7e15, "chinchilla")


def test_ladder_parents_are_no_points_and_approach1_takes_run_ends_only():
    from analysis.load import endpoint_curves, runs_table

    def row(name, N, D, loss, **kw):
        return {"name": name, "status": "completed", "N": N, "D": D, "loss": loss, "C": 6 * N * D, "C_convention": "6N",
                "schedule": "wsd", "run_dir": f"s/{name}", **kw}

    rows = [row("parent-a", 1e5, 8e6, 3.5, schedule="constant", role="parent"),
            row("a-D2e6", 1e5, 2e6, 3.4, role="branch", parent="parent-a", C_spent=6 * 1e5 * 2e6 * 0.2),
            row("a-D1e7", 1e5, 1e7, 3.1, role="branch", parent="parent-a"),
            row("b-D1e7", 4e5, 1e7, 3.0, schedule="cosine")]
    df = runs_table(rows)
    assert df.set_index("name").loc["parent-a", "reason"].startswith("a ladder parent")
    assert set(usable(df)["name"]) == {"a-D2e6", "a-D1e7", "b-D1e7"}
    assert df.set_index("name").loc["a-D2e6", "C_spent"] == pytest.approx(2.4e11)
    ends = endpoint_curves(df)
    assert list(ends["run"]) == ["N=100000", "N=100000", "N=400000"]  # one curve per size, through its runs' ends
    np.testing.assert_allclose(ends["loss"], [3.4, 3.1, 3.0])

"""`analysis report --wandb` (an offline run in the sweep's group, read back with the wandb CLI) and `analysis fit
--wandb ENTITY/PROJECT[/GROUP]` through the public API (a fake api object)."""

import json
import sys
from pathlib import Path

import pytest

from analysis import __main__ as cli
from analysis.load import ANALYSIS_JOB, load_wandb_offline, read_wandb_file, wandb_api, wandb_path
from analysis.report import wandb_report as W
from analysis.synthetic import isoflop_runs, write_sweep
from scaling import record as R

sys.path.insert(0, str(Path(__file__).parent))
from test_analysis_load import FakeApi, FakeRun  # noqa: E402 (the fake wandb.Api the loader tests use)


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No WANDB_MODE, no API key, a HOME without .netrc: the default is offline."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def _sweep(tmp_path: Path, bpb: bool = True) -> Path:
    sweep = write_sweep(tmp_path / "sweep", isoflop_runs(budgets=(1e17, 1e18), n_per_budget=4), failed=1, diverged=0,
                        sweep="isoflop-demo")
    if bpb:  # records of this version carry bits per byte: 2.5 bytes per token
        for path in sweep.rglob(R.RECORD_FILE):
            rec = R.read_record(path)
            R.write_record(path.parent, rec | R.text_metrics(rec["loss"], 2.5, 2.4))
    return sweep


def _read_back(report_dir: Path) -> dict:
    files = list((report_dir / "wandb").rglob("*.wandb"))
    assert len(files) == 1
    return read_wandb_file(files[0])  # through `wandb leet inspect`, the wandb CLI's reader


def test_log_report_writes_an_offline_run_whose_summary_holds_the_fit(tmp_path, no_wandb_login):
    # A report folder as write_report leaves it (results.json, figures/*.png), from a quick Approach 2 fit.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.load import load_sweep
    from analysis.report import fit_all

    sweep, report = _sweep(tmp_path), tmp_path / "report"
    res, _ = fit_all(load_sweep(sweep, target="bpb"), approaches=(2,), n_bootstrap=0, n_jobs=1)
    R.write_json_atomic(report / W.RESULTS, res)
    (report / W.FIGURES).mkdir()
    plt.plot([1, 2], [3, 4])
    plt.savefig(report / W.FIGURES / "isoflops.png")
    plt.close("all")
    run = W.log_report(report, sweep, project="demo")
    assert run["mode"] == "offline" and (run["project"], run["group"]) == ("demo", "isoflop-demo")
    back = _read_back(report)
    assert Path(run["dir"]) == next((report / "wandb").rglob("*.wandb")).parent  # what `wandb sync` takes
    assert (back["job_type"], back["group"], back["state"]) == (ANALYSIS_JOB, "isoflop-demo", "finished")
    s = back["summary"]
    for key in ("a", "b", "N_opt", "D_opt"):
        assert s[f"approach2/{key}"] == pytest.approx(res["approach2"][key], rel=1e-12)
    assert s["kaplan/L(C)/alpha_C"] == pytest.approx(res["kaplan"]["L(C)"]["alpha_C"], rel=1e-12)
    assert (s["n_runs"], s["n_used"], s["conventions/target"]) == (10, 8, "bpb")  # + a failed and a missing run
    # the tables and the figure are wandb media in the run
    for table in ("fits", "approach2/minima", "excluded"):
        assert s[f"tables/{table}"]["_type"] == "table-file"
    assert s["figures/isoflops"]["_type"] == "image-file"
    # the analysis run is no training run: a loader of the group's offline runs leaves it out
    with pytest.raises(ValueError, match="hold only analysis runs"):
        load_wandb_offline(report)


@pytest.mark.slow  # the whole report (every fit and figure): ~1-2 min on two shared cores
def test_report_wandb_cli_logs_the_report(tmp_path, no_wandb_login, capsys):
    sweep = _sweep(tmp_path)
    assert cli.main(["report", str(sweep), "--bootstrap", "0", "--target", "bpb", "--wandb"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((sweep / "report" / "results.json").read_text())
    back = _read_back(sweep / "report")
    assert f"wandb sync {next((sweep / 'report' / 'wandb').rglob('*.wandb')).parent}" in printed
    assert (back["job_type"], back["group"]) == (ANALYSIS_JOB, "isoflop-demo")
    s = back["summary"]
    for key in ("E", "A", "B", "alpha", "beta", "N_opt", "D_opt", "L_opt"):
        assert s[f"approach3/{key}"] == pytest.approx(res["approach3"][key], rel=1e-12)
    figures = {p.stem for p in (sweep / "report" / "figures").glob("*.png")}
    assert figures and {k.split("/", 1)[1] for k in s if k.startswith("figures/")} == figures
    # the fitted target's unit, in the figures and the report
    assert "final loss [bits per byte]" in (sweep / "report" / "figures" / "isoflops.svg").read_text()
    assert "final validation loss in bits per byte" in (sweep / "report" / "report.md").read_text()


def test_flatten_gives_summary_fits_and_tables():
    res = {"n_runs": 5, "conventions": {"C": "6N", "target": "loss"}, "C_query": 1e21,
           "approach3": {"E": 1.7, "alpha": 0.3, "ci95": {"E": [1.6, 1.8]}, "n_resamples": 10,
                         "identification": {"alpha": {"identified": False, "reason": "runs away"}}},
           "kaplan": {"L(N)": {"alpha": 0.07, "N_c": 8.8e13}}, "approach1": {"error": "one D per size"},
           "approach2": {"a": 0.5, "minima": [{"C": 1e17, "N_opt": 1e6, "extra": [1, 2]}]},
           "excluded": [{"name": "x", "status": "failed", "reason": "oom"}], "bad": float("nan")}
    summary, fits, tables = W.flatten(res)
    assert summary["approach3/E"] == 1.7 and summary["approach3/E_ci95"] == [1.6, 1.8]
    assert "approach3/alpha_ci95" not in summary and summary["approach3/identification/alpha/reason"] == "runs away"
    assert summary["kaplan/L(N)/N_c"] == 8.8e13 and summary["approach1/error"] == "one D per size"
    assert summary["n_runs"] == 5 and summary["conventions/target"] == "loss" and "bad" not in summary
    e = fits[(fits["fit"] == "approach3") & (fits["symbol"] == "E")].iloc[0]
    assert (e["estimate"], e["ci95_low"], e["ci95_high"]) == (1.7, 1.6, 1.8)
    assert set(fits["fit"]) == {"approach3", "kaplan/L(N)", "approach2"}  # top-level counts are no fit
    assert tables["approach2/minima"].iloc[0]["extra"] == "[1, 2]" and tables["excluded"].iloc[0]["name"] == "x"


def test_mode_follows_wandb_mode_then_the_api_key(no_wandb_login, monkeypatch):
    assert W.default_mode() == "offline"
    netrc = no_wandb_login / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert W.default_mode() == "online"  # `wandb login` wrote a key
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert W.default_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert W.default_mode() == "online"


def test_group_and_project_come_from_the_runs_config(tmp_path):
    sweep = _sweep(tmp_path, bpb=False)
    assert W.sweep_identity(sweep) == {"project": W.DEFAULT_PROJECT, "entity": None, "group": "isoflop-demo"}
    run_dir = next(p.parent for p in sorted(sweep.rglob(R.RECORD_FILE)))
    (run_dir / "config.json").write_text(json.dumps({"logging": {"project": "p1", "entity": "me", "group": "g"}}))
    assert W.sweep_identity(sweep) == {"project": "p1", "entity": "me", "group": "g"}


def test_log_report_needs_a_written_report(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"results.json does not exist: write the report first"):
        W.log_report(tmp_path, tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# fit --wandb ENTITY/PROJECT[/GROUP]: the public API
# --------------------------------------------------------------------------------------------------------------------
def fake_run(name: str, summary: dict, group: str, job_type: str = "train") -> FakeRun:
    run = FakeRun(name, "finished", summary, {}, group)
    run.job_type = job_type  # what the public API's Run has; `analysis report --wandb` writes "analysis"
    return run


def test_fit_wandb_entity_project_group_reads_the_api(tmp_path, monkeypatch, capsys):
    sweep = _sweep(tmp_path)
    runs = [fake_run(p.parent.name, R.summary_fields(R.read_record(p)), "isoflop-demo")
            for p in sorted(sweep.rglob(R.RECORD_FILE))]
    runs += [fake_run("analysis-isoflop-demo", {"approach3/E": 1.0}, "isoflop-demo", job_type=ANALYSIS_JOB),
             fake_run("other", runs[0].summary, "another-sweep")]
    api = FakeApi(runs)
    monkeypatch.setattr(cli, "wandb_api", lambda: api)
    out = tmp_path / "fit.json"
    assert cli.main(["fit", "--wandb", "me/proj/isoflop-demo", "--approach", "2", "--bootstrap", "0", "--target",
                     "bpb", "--json", str(out)]) == 0
    assert api.calls == [("me/proj", {"group": "isoflop-demo"})]
    res = json.loads(out.read_text())
    assert res["n_runs"] == 9 and res["n_used"] == 8 and res["conventions"]["target"] == "bpb"  # 8 + 1 failed
    from_records = tmp_path / "records.json"
    assert cli.main(["fit", "--sweep", str(sweep), "--approach", "2", "--bootstrap", "0", "--target", "bpb",
                     "--json", str(from_records)]) == 0
    assert res["approach2"]["N_opt"] == pytest.approx(json.loads(from_records.read_text())["approach2"]["N_opt"])
    assert cli.main(["fit", "--wandb", "me/proj", "--approach", "2", "--bootstrap", "0", "--json", str(out)]) == 0
    assert api.calls[-1] == ("me/proj", None) and json.loads(out.read_text())["n_runs"] == 10  # every group


@pytest.mark.parametrize("text", ["justone", "a/b/c/d", "a//b"])
def test_fit_wandb_path_that_is_neither_folder_nor_project(text, capsys):
    with pytest.raises(ValueError, match=r"no folder of offline runs here, nor ENTITY/PROJECT\[/GROUP\]"):
        wandb_path(text)
    assert cli.main(["fit", "--wandb", text]) == 2
    assert "nor ENTITY/PROJECT[/GROUP]" in capsys.readouterr().err
    assert wandb_path("me/proj/") == ("me/proj", None) and wandb_path("me/proj/g") == ("me/proj", "g")


def test_wandb_api_without_a_key_is_one_clear_error(monkeypatch):
    import wandb

    def refuse(**_):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "Api", refuse)
    with pytest.raises(ValueError, match=r"cannot open the wandb API \(UsageError: api_key not config.*wandb login"):
        wandb_api()

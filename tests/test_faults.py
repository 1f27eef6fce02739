"""Fault injection (issue 14): each bad input is one `error:` line naming the key or file and the fix, a non-zero exit,
no traceback, and nothing already written is lost."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.__main__ import main
from analysis.synthetic import isoflop_runs, write_sweep

REPO = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO / "scripts" / "slurm_local.sh"


def digest(folder: Path) -> dict:
    """Every file below `folder` by its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, argv: list[str], *needles: str) -> str:
    """`python -m analysis ARGV` exits 2 with one `error:` line (no traceback) holding every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("faults") / "sweep",
                       isoflop_runs(budgets=(1e17, 1e18, 1e19), n_per_budget=5, noise=0.005))


@pytest.fixture
def reported(sweep, tmp_path) -> Path:
    """A copy of the sweep with an earlier report in it, which a refused command must not touch."""
    s = shutil.copytree(sweep, tmp_path / "s")
    (s / "report").mkdir()
    (s / "report" / "report.md").write_text("# the report of yesterday\n")
    (s / "report" / "results.json").write_text('{"C_query": 1e20}\n')
    return s


# --------------------------------------------------------------------------------------------------------------------
# analysis CLI
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd, flag, value, fix", [
    ("fit", "--at-C", "0", "positive, finite number of FLOPs"),         # was: TypeError in the summary
    ("fit", "--at-C", "-1e10", "positive, finite number of FLOPs"),     # was: TypeError
    ("report", "--at-C", "-1e10", "positive, finite number of FLOPs"),  # was: a report for a negative budget
    ("report", "--backtest-below", "nan", "positive, finite number of FLOPs"),
    ("fit", "--bootstrap", "-5", "0 (no intervals) or a number of resamples of at least 2"),  # was: accepted
    ("report", "--bootstrap", "-5", "0 (no intervals) or a number of resamples of at least 2"),
    ("predict", "--bootstrap", "0", "a number of resamples of at least 2"),
])
def test_bad_numbers_are_refused_before_anything_is_written(reported, tmp_path, capsys, cmd, flag, value, fix):
    before = digest(reported)
    argv = {"fit": ["fit", "--sweep", str(reported), "--json", str(tmp_path / "fit.json")],
            "report": ["report", str(reported)],
            "predict": ["predict", str(reported), "--at-C", "1e20", "--out", str(tmp_path / "study")]}[cmd]
    refused(capsys, argv + [f"{flag}={value}"], f"error: {flag} ", fix)
    assert digest(reported) == before
    assert not (tmp_path / "fit.json").exists() and not (tmp_path / "study").exists()


def _prediction() -> dict:
    return {"C": 1e20, "headline": "approach3", "conventions": {"N": "non_embedding", "C": "6N"},
            "prediction": {"N_opt": 7e8, "D_opt": 2.4e10, "L_opt": 2.57},
            "prediction_ci95": {"N_opt": [5e8, 1e9], "L_opt": [2.5, 2.6], "D_opt": [1e10, 3e10]},
            "estimates": {"approach3.E": 1.5, "approach3.A": 270.0, "approach3.B": 300.0, "approach3.alpha": 0.31,
                          "approach3.beta": 0.26}}


def _without(key: str) -> dict:
    p = _prediction()
    *head, leaf = key.split(".", 1) if key.startswith(("prediction.", "estimates.")) else [key]
    (p[head[0]] if head else p).pop(leaf)
    return p


@pytest.mark.parametrize("content, needles", [
    ("{not json", ["cannot read the prediction"]),
    ("[1, 2, 3]", ["holds a JSON list, not the prediction object"]),
    (_without("C"), ["key 'C' is missing, expected a positive number of FLOPs"]),
    (_without("estimates.approach3.beta"), ["key 'estimates.approach3.beta' is missing, expected a number"]),
    (_prediction() | {"prediction": [7e8, 2.4e10, 2.57]}, ["key 'prediction' is [", "expected an object"]),
    (_prediction() | {"prediction": {"N_opt": "7e8", "D_opt": 2.4e10, "L_opt": 2.57}},
     ["key 'prediction.N_opt' is '7e8', expected a number"]),
    (_prediction() | {"prediction_ci95": {"N_opt": [5e8, 1e9], "L_opt": 2.5}},
     ["key 'prediction_ci95.L_opt' is 2.5, expected an interval [low, high]"]),
    (_prediction() | {"conventions": "6N"}, ["key 'conventions' is '6N'"]),
])
def test_verify_names_the_file_and_the_key_of_a_hand_edited_prediction(sweep, tmp_path, capsys, content, needles):
    """verify read prediction.json's keys unchecked: KeyError / AttributeError / TypeError tracebacks."""
    path = tmp_path / "study" / "prediction.json"
    path.parent.mkdir()
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    before = digest(path.parent)
    refused(capsys, ["verify", str(path), str(sweep), "--out", str(path.parent)], f"error: {path}: ", *needles,
            "give the prediction.json that `python -m analysis predict` wrote")
    assert digest(path.parent) == before  # no verification.json, the prediction as it was


def _mark_data(run_dirs, source_hash: str, tokenizer: str = "bytes-e73f8c0c4223") -> None:
    """Give records the data identity scaling.train.loop writes (record fields `data` and `tokenizer`)."""
    for d in run_dirs:
        rec = json.loads((d / "record.json").read_text())
        rec["tokenizer"] = {"name": tokenizer.split("-")[0], "identity": tokenizer, "vocab_size": 257}
        rec["data"] = {"source": f"local:{source_hash}:field=:doc=65536:max=None",
                       "source_description": f"/data/corpus-{source_hash[:4]}.txt", "tokenizer": tokenizer}
        (d / "record.json").write_text(json.dumps(rec))


def test_report_refuses_runs_of_different_data_and_names_the_groups(reported, capsys):
    """`report runs/` fitted runs of different corpora and tokenizers together without a word."""
    _mark_data([p.parent for p in reported.glob("C1e+1[78]/*/record.json")], "aaaa1111aaaa1111")
    _mark_data([p.parent for p in reported.glob("C1e+19/*/record.json")], "bbbb2222bbbb2222", "bpe4096-0123456789ab")
    before = digest(reported)
    refused(capsys, ["report", str(reported), "--bootstrap", "0"], "trained on different data or tokenizers",
            "12 run(s) on /data/corpus-aaaa.txt (data.source local:aaaa1111aaaa1111",
            "5 run(s) on /data/corpus-bbbb.txt", "tokenizer bpe4096-0123456789ab", f"under {reported / 'C1e+19'}",
            "Point at a folder holding one group's runs", "--allow-mixed-data")
    assert digest(reported) == before
    # One group's folder is accepted as it is; the flag fits them together.
    assert main(["report", str(reported / "C1e+19"), "--bootstrap", "0", "--at-C", "1e20"]) == 0
    assert main(["report", str(reported), "--bootstrap", "0", "--allow-mixed-data"]) == 0
    assert json.loads((reported / "report" / "results.json").read_text())["n_used"] == 15


def test_a_corrupt_record_names_the_cli_flag_that_skips_it(reported, capsys):
    """The message said 'pass skip_corrupt=True', which no command accepted."""
    bad = next(reported.glob("C1e+18/*/record.json"))
    bad.write_text('{"name": "trunc')
    before = digest(reported)
    refused(capsys, ["report", str(reported), "--bootstrap", "0"], str(bad), "--skip-corrupt")
    refused(capsys, ["fit", "--sweep", str(reported), "--bootstrap", "0"], str(bad), "--skip-corrupt")
    assert digest(reported) == before
    assert main(["report", str(reported), "--bootstrap", "0", "--skip-corrupt"]) == 0
    res = json.loads((reported / "report" / "results.json").read_text())
    assert {e["name"]: e["reason"].split(":")[0] for e in res["excluded"]}[bad.parent.name] == "status corrupt"


# --------------------------------------------------------------------------------------------------------------------
# data and sampling
# --------------------------------------------------------------------------------------------------------------------
def test_scaling_cache_pointing_at_a_file_is_one_clear_error(tmp_path):
    """Was an 11-frame NotADirectoryError from the cache's mkdir."""
    (tmp_path / "afile").write_text("not a folder")
    env = {**os.environ, "SCALING_CACHE": str(tmp_path / "afile" / "sub")}
    out = subprocess.run([sys.executable, "-m", "scaling.data", "--source", "synthetic", "--synthetic-vocab", "8",
                          "--synthetic-tokens", "20000"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr  # was 1, unlike every other command
    assert out.stderr.strip().splitlines() == [
        f"error: SCALING_CACHE='{tmp_path / 'afile' / 'sub'}': '{tmp_path / 'afile'}' is a file, not a folder; "
        "point SCALING_CACHE at a folder (created if missing), e.g. ~/.cache/scaling"]
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_a_one_document_corpus_names_the_setting_that_splits_it(tmp_path):
    """The hint said 'separate documents with a blank line', which does nothing unless data.doc_bytes=0: paragraphs
    are packed into documents of about doc_bytes (64 KiB)."""
    from scaling.data.tokens import DataConfig, load_tokens
    from scaling.data.tokenizers import TokenizerConfig

    (tmp_path / "two.txt").write_text("The first paragraph.\n\nThe second paragraph.\n")

    def cfg(doc_bytes: int) -> DataConfig:
        return DataConfig(source="local", path=str(tmp_path / "two.txt"), doc_bytes=doc_bytes, val_fraction=0.5,
                          tokenizer=TokenizerConfig(kind="bytes"), cache_dir=str(tmp_path / "cache"))

    with pytest.raises(ValueError, match=r"only 1 document.*set data.doc_bytes=0 \(one document per blank-line-"):
        load_tokens(cfg(65_536))
    data = load_tokens(cfg(0))  # the advice works
    assert (data.meta["train_docs"], data.meta["val_docs"]) == (1, 1)


def test_a_prompt_longer_than_the_context_is_refused_not_cut():
    """generate() silently kept the prompt's last seq_len - max_new_tokens tokens."""
    import jax

    from scaling.model.decoder import ModelConfig, init_params
    from scaling.eval.sample import generate

    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=20, seq_len=16)
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match=r"the prompt is 14 tokens, .*seq_len=16\) holds at most 12 prompt tokens "
                                         r"with max_new_tokens=4: .* or pass --truncate-prompt to keep its last 12"):
        generate(cfg, params, list(range(14)), 4, temperature=0.0)
    assert len(generate(cfg, params, list(range(12)), 4, temperature=0.0)) == 4  # a prompt that fits


# --------------------------------------------------------------------------------------------------------------------
# scripts/slurm_local.sh: refuses a configuration it did not write, backs up what it replaces
# --------------------------------------------------------------------------------------------------------------------
def _slurm_local(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # Another config folder and state folder: the refusal comes before anything touches the system.
    env = {**os.environ, "SLURM_LOCAL_ETC": str(tmp_path / "etc"), "SLURM_LOCAL_DIR": str(tmp_path / "state")}
    return subprocess.run(["bash", str(SLURM_LOCAL), *args], env=env, capture_output=True, text=True, timeout=60)


def test_slurm_local_refuses_to_replace_or_stop_a_configuration_it_did_not_write(tmp_path):
    (tmp_path / "etc").mkdir()
    theirs = "ClusterName=production\nSlurmctldHost=head0\n"
    (tmp_path / "etc" / "slurm.conf").write_text(theirs)
    out = _slurm_local(tmp_path, "start")
    assert out.returncode == 4, out.stderr
    assert f"refusing to replace {tmp_path / 'etc' / 'slurm.conf'}: this script did not write it" in out.stderr
    assert "start --force" in out.stderr
    out = _slurm_local(tmp_path, "stop")  # would have run `scancel --user=root`
    assert out.returncode == 4 and "refusing to stop" in out.stderr, out.stderr
    assert (tmp_path / "etc" / "slurm.conf").read_text() == theirs
    assert sorted(p.name for p in (tmp_path / "etc").iterdir()) == ["slurm.conf"]
    assert not (tmp_path / "state").exists()


def test_slurm_local_backs_up_what_it_replaces_and_marks_what_it_writes(tmp_path):
    conf = tmp_path / "slurmdbd.conf"
    conf.write_text("StoragePass=theirs\n")
    conf.chmod(0o600)
    write = f"printf 'StoragePass=ours\\n' | write_conf {conf} 600"
    script = f"source {SLURM_LOCAL}; FORCE=1; check_writable {conf}; {write}; ours {conf}; {write}"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    backups = sorted(tmp_path.glob("slurmdbd.conf.bak-*"))
    assert len(backups) == 1  # the second, identical write replaced nothing
    assert backups[0].read_text() == "StoragePass=theirs\n" and backups[0].stat().st_mode & 0o777 == 0o600
    lines = conf.read_text().splitlines()
    assert lines[0].startswith("# written by scaling scripts/slurm_local.sh") and lines[1:] == ["StoragePass=ours"]
    assert conf.stat().st_mode & 0o777 == 0o600


def test_slurm_local_does_not_take_a_stale_pid_file_for_its_daemon(tmp_path):
    # Daemons killed without a clean exit leave pid files; after a reboot the pid may be any process. Trusting it
    # left slurmdbd unstarted (sacct down: "timed out waiting for sacct"), and `stop` would have killed that process.
    other = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = tmp_path / "slurmdbd.pid"
        for content in (str(other.pid), "", "12ab"):
            pidfile.write_text(content + "\n")
            for name in ("sleep", "slurmdbd"):
                out = subprocess.run(["bash", "-c", f"source {SLURM_LOCAL}; running {pidfile} {name}"],
                                     capture_output=True, text=True, timeout=60)
                alive = content == str(other.pid) and name == "sleep"
                assert out.returncode == (0 if alive else 1), (content, name, out.stderr)
        out = subprocess.run(["bash", "-c", f"source {SLURM_LOCAL}; running {tmp_path / 'none.pid'} sleep"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert other.poll() is None
    finally:
        other.kill()


def test_slurm_local_stops_only_the_database_and_munge_it_started(tmp_path):
    # `stop` kills mariadbd / munged only when the running one is the process `start` recorded: after a reboot the
    # machine's own database may hold that pid file, and it is not ours to stop.
    state, pidfile = tmp_path / "state", tmp_path / "mysqld.pid"
    state.mkdir()
    for recorded, running_pid, ours in (("mariadbd 4242", "4242", True), ("mariadbd 4242", "5151", False),
                                        ("mariadbd", "4242", False), ("munged 4242", "4242", False)):
        (state / "started").write_text(recorded + "\n")
        pidfile.write_text(running_pid + "\n")
        script = f"W={state}; source {SLURM_LOCAL}; W={state}; started_by_us mariadbd {pidfile}"
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        assert out.returncode == (0 if ours else 1), (recorded, running_pid, out.stderr)

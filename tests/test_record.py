"""scaling.record, the run record's one owner: schema, versions, atomic writes, the run table and the sweep manifest."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scaling import record as R

DATA = Path(__file__).resolve().parent / "data"
V1 = DATA / "record_v1.json"


def v1() -> dict:
    return json.loads(V1.read_text())


def test_module_imports_no_jax_or_trainer():
    code = ("import sys, scaling.record\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', 'orbax', "
            "'hydra', 'numpy') or m.startswith('scaling.') and m not in ('scaling.record', 'scaling.accounting')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_round_trip_stamps_the_version_and_cleans_nan(tmp_path):
    rec = v1() | {"loss": np.float64(3.25), "train_loss": float("nan"), "steps": np.int64(1137)}
    written = R.write_record(tmp_path / "run", rec)
    back = R.read_record(tmp_path / "run")
    assert back == written == json.loads((tmp_path / "run" / R.RECORD_FILE).read_text())
    assert back["schema_version"] == R.SCHEMA_VERSION == 2
    assert back["loss"] == 3.25 and back["train_loss"] is None and back["steps"] == 1137
    assert R.read_record(tmp_path / "run" / R.RECORD_FILE) == back  # the file path works too
    assert R.record_status(tmp_path / "run") == "completed" and R.record_status(tmp_path / "none") is None
    assert [p.name for p in (tmp_path / "run").iterdir()] == [R.RECORD_FILE]  # no temp file left


def test_a_version_1_record_is_read_and_keeps_its_version_visible(tmp_path):
    rec = R.read_record(V1)
    assert "schema_version" not in v1() and rec["schema_version"] == 1
    row = R.record_row(rec, V1.parent)
    assert row["schema_version"] == 1 and row["budget"] == 5e11 and row["budget_convention"] == "chinchilla"
    assert (row["C"], row["C_convention"], row["loss"]) == (499842809856.0, "chinchilla", 5.96584577858448)
    # A version-1 record lacking a required field is refused with the fix.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / R.RECORD_FILE).write_text(json.dumps({k: v for k, v in v1().items() if k != "flops_per_token"}))
    with pytest.raises(R.RecordError, match=r"old/record.json: record of an older format \(schema_version 1\) lacks "
                                            r"field 'flops_per_token': rerun that run"):
        R.read_record(tmp_path / "old")
    assert R.record_status(tmp_path / "old") == "corrupt"
    # NaN tokens (an older writer's) read as null, as write_record writes them.
    (tmp_path / "old" / R.RECORD_FILE).write_text(json.dumps(v1() | {"status": "diverged", "loss": float("nan")}))
    assert R.read_record(tmp_path / "old")["loss"] is None


@pytest.mark.parametrize("text, match", [
    ('{"name": "x", "status": "compl', r"not a readable run record \(not valid JSON, truncated"),
    ("", r"not a readable run record \(the file is empty\)"),
    ("[1, 2]", r"is not a run record: it holds a JSON list, not an object"),
])
def test_truncated_or_non_object_records_name_the_file(tmp_path, text, match):
    (tmp_path / R.RECORD_FILE).write_text(text)
    with pytest.raises(R.RecordError, match=match) as e:
        R.read_record(tmp_path)
    assert str(tmp_path / R.RECORD_FILE) in str(e.value) and "rerun that run" in str(e.value)
    assert R.record_status(tmp_path) == "corrupt"


@pytest.mark.parametrize("change, match", [
    ({"schema_version": 3}, r"field 'schema_version' is 3, newer than this code reads \(2\); update the scaling"),
    ({"schema_version": 2, "N": None}, r"field 'N' is None, expected a number"),
    ({"schema_version": 2, "status": "done"}, r"field 'status' is 'done', expected one of running, completed"),
    ({"schema_version": 2, "C_convention": "6ND"}, r"field 'C_convention' is '6ND', expected one of 6N, kaplan"),
    ({"schema_version": 2, "budget": {"kind": "flops", "value": 1e12}}, r"field 'budget' is .*expected an object"),
    ({"schema_version": 2, "flops_per_token": {"6N": 1.0}}, r"field 'flops_per_token' is .*kaplan, chinchilla"),
    ({"schema_version": 2, "loss": None}, r"field 'loss' is null but status is completed"),
    ({"schema_version": 2, "loss": "low"}, r"field 'loss' is 'low', expected a number or null"),
])
def test_wrong_or_newer_records_name_the_file_and_field(tmp_path, change, match):
    (tmp_path / R.RECORD_FILE).write_text(json.dumps(v1() | change))
    with pytest.raises(R.RecordError, match=match) as e:
        R.read_record(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / R.RECORD_FILE}: field")


def test_a_missing_field_of_a_current_record_and_failed_runs_without_loss(tmp_path):
    rec = {k: v for k, v in v1().items() if k != "seed"} | {"schema_version": 2}
    (tmp_path / R.RECORD_FILE).write_text(json.dumps(rec))
    with pytest.raises(R.RecordError, match="field 'seed' is missing; rerun that run"):
        R.read_record(tmp_path)
    for status in ("failed", "diverged", "running"):  # loss null is fine when the run did not complete
        assert R.write_record(tmp_path / status, v1() | {"status": status, "loss": float("nan")})["loss"] is None
    # A run that failed before its evaluation has no loss yet: written (and, from version 1, read) as null.
    no_loss = {k: v for k, v in v1().items() if k != "loss"} | {"status": "failed", "error": "boom"}
    assert R.write_record(tmp_path / "early", no_loss)["loss"] is None
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / R.RECORD_FILE).write_text(json.dumps(no_loss))
    assert R.read_record(tmp_path / "v1")["loss"] is None and R.record_status(tmp_path / "v1") == "failed"
    with pytest.raises(R.RecordError, match="field 'loss' is missing"):  # a current-version record must have it
        R.validate_record(no_loss | {"schema_version": 2}, "x/record.json")
    with pytest.raises(R.RecordError, match="field 'status' is 'done'"):  # write_record validates before writing
        R.write_record(tmp_path / "bad", v1() | {"status": "done"})
    assert not (tmp_path / "bad" / R.RECORD_FILE).exists()


def test_atomic_write_keeps_the_old_file_and_leaves_no_temp_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    R.write_json_atomic(path, {"a": 1})
    with pytest.raises(ValueError, match="not JSON-serializable"):
        R.write_json_atomic(path, {"a": object()})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        R.write_text_atomic(path, "new text")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    # mkstemp's 0600 would make records and reports unreadable to the rest of a group sharing a sweep directory
    path = tmp_path / "r.json"
    R.write_json_atomic(path, {"a": 1})
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert (path.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)


def test_clean_json():
    out = R.clean_json({"nan": float("nan"), "inf": np.float32("inf"), "f": np.float32(1.5), "i": np.int64(3),
                        "b": np.bool_(True), "t": (1, np.array(2.0)), 7: [np.array([4])], "s": "x", "n": None})
    assert out == {"nan": None, "inf": None, "f": 1.5, "i": 3, "b": True, "t": [1, 2.0], "7": [4], "s": "x",
                   "n": None}
    assert type(out["f"]) is float and type(out["i"]) is int and type(out["b"]) is bool
    assert json.dumps(out, allow_nan=False)
    with pytest.raises(ValueError, match=r"value <object object at .*> of type object is not JSON-serializable"):
        R.clean_json({"x": [object()]})
    with pytest.raises(ValueError, match="of type ndarray is not JSON-serializable"):
        R.clean_json(np.zeros(3))


def test_git_commit_inside_and_outside_a_checkout(tmp_path):
    head = R.git_commit()
    assert head is None or len(head) == 40
    assert R.git_commit(tmp_path) is None
    # A package inside another repository but not tracked by it (a wheel in a git-ignored .venv) has no commit.
    import subprocess

    repo = tmp_path / "user_repo"
    (repo / ".venv" / "scaling").mkdir(parents=True)
    (repo / ".gitignore").write_text(".venv/\n")
    (repo / ".venv" / "scaling" / "record.py").write_text("# installed copy\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["init", "-q"], ["add", ".gitignore"], ["commit", "-q", "-m", "init"]):
        subprocess.run(git + cmd, cwd=repo, check=True, capture_output=True)
    assert R.git_commit(repo / ".venv" / "scaling" / "record.py") is None
    assert len(R.git_commit(repo / ".gitignore")) == 40  # a tracked file of that repository does have one


def test_record_row_has_the_contract_columns_in_order():
    assert R.COLUMNS[:3] == ["name", "status", "sweep"]
    assert R.COLUMNS[-10:-4] == ["schema_version", "budget_convention", "role", "parent", "branch_step", "C_spent"]
    assert R.COLUMNS[-4:] == ["bytes_per_token", "chars_per_token", "bpb", "bits_per_char"]
    assert len(R.COLUMNS) == 49 == len(set(R.COLUMNS))
    row = R.record_row(R.read_record(V1), "runs/x")
    assert list(row) == R.COLUMNS and row["run_dir"] == "runs/x" and row["lr"] == 0.01 and row["d_ff"] == 32
    # a record from before ladders: no role, no parent, and it spent its own C
    assert (row["role"], row["parent"], row["branch_step"], row["C_spent"]) == (None, None, None, row["C"])


def test_summary_fields_are_what_analysis_reads_from_wandb():
    fields = R.summary_fields(v1())
    # null in a completed run, or absent from a record written before bits per byte: left out
    assert set(fields) == set(R.SUMMARY_KEYS) - {"error", "diverged_step", "bpb", "bits_per_char", "bytes_per_token",
                                                 "chars_per_token"}
    failed = R.summary_fields(v1() | {"status": "failed", "loss": None, "error": "boom"})
    assert failed["error"] == "boom" and "loss" not in failed
    assert (fields["budget"], fields["budget_convention"], fields["C_convention"]) == (5e11, "chinchilla", "chinchilla")
    running = {k: v for k, v in v1().items() if k not in ("loss", "train_loss")} | {"status": "running"}
    assert "loss" not in R.summary_fields(running) and R.summary_fields(running)["status"] == "running"


def test_manifest_round_trip_and_errors(tmp_path):
    content = {"name": "s", "convention": "chinchilla", "planned": [{"name": "a", "budget": 1e12, "N": 10.0}]}
    R.write_manifest(tmp_path, content)
    assert R.read_manifest(tmp_path) == content and R.read_manifest(tmp_path / "nowhere") is None
    with pytest.raises(R.RecordError, match=r"field 'planned\[0\]' is .*expected an object with a 'name'"):
        R.write_manifest(tmp_path / "bad", {"planned": [{"budget": 1}]})
    (tmp_path / R.MANIFEST_FILE).write_text('{"planned": [')
    with pytest.raises(R.RecordError, match=r"sweep.json is not a readable sweep manifest .*relaunch the sweep"):
        R.read_manifest(tmp_path)
    (tmp_path / R.MANIFEST_FILE).write_text('{"name": "s"}')
    with pytest.raises(R.RecordError, match="field 'planned' is missing, expected a list of planned runs; relaunch"):
        R.read_manifest(tmp_path)


def test_read_runs_lists_missing_and_corrupt_runs(tmp_path):
    R.write_record(tmp_path / "a", v1() | {"name": "a"})
    R.write_record(tmp_path / "deep" / "b", v1() | {"name": "b", "status": "failed", "loss": None, "error": "boom"})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / R.RECORD_FILE).write_text('{"name": "c"')
    R.write_manifest(tmp_path, {"name": "s", "convention": "chinchilla",
                                "planned": [{"name": n, "budget": 5e11, "N": 1760, "D": 1e6} for n in "abcd"]})
    with pytest.raises(R.RecordError, match=r"c/record.json is not a readable run record .*--skip-corrupt"):
        R.read_runs(tmp_path)
    rows = {r["name"]: r for r in R.read_runs(tmp_path, skip_corrupt=True)}
    assert {n: r["status"] for n, r in rows.items()} == {"a": "completed", "b": "failed", "c": "corrupt",
                                                          "d": "missing"}
    assert all(list(r) == R.COLUMNS for r in rows.values())
    assert (rows["d"]["budget"], rows["d"]["N"], rows["d"]["budget_convention"]) == (5e11, 1760, "chinchilla")
    assert "not valid JSON" in rows["c"]["error"] and rows["b"]["error"] == "boom"
    with pytest.raises(R.RecordError, match="does not exist"):
        R.read_runs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(R.RecordError, match="holds no record.json and no sweep.json"):
        R.read_runs(tmp_path / "empty")


def test_analysis_fixture_records_match_the_real_config_fields(tmp_path):
    """The fixture builds records through write_record with the real model/optim objects (no drift)."""
    from analysis.synthetic import MODEL, OPTIM, isoflop_runs, write_sweep
    from scaling.model.decoder import POS_ENCODINGS, ModelConfig
    from scaling.train.optim import OptimConfig

    assert set(MODEL) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(OPTIM) == {f.name for f in dataclasses.fields(OptimConfig)}
    ModelConfig(**MODEL), OptimConfig(**OPTIM)  # valid values, not only the right keys
    assert MODEL["pos_encoding"] in POS_ENCODINGS
    sweep = write_sweep(tmp_path / "s", isoflop_runs(budgets=(1e17,), n_per_budget=3), convention="kaplan")
    rows = R.read_runs(sweep)
    assert {r["C_convention"] for r in rows if r["status"] != "missing"} == {"kaplan"}
    assert all(r["schema_version"] == 2 for r in rows if r["status"] != "missing")

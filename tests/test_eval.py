"""Downstream evaluation (scaling/eval/tasks.py, score.py, suite.py, the CLI and the `eval` config): scores equal a
by-hand log-likelihood, prompts are a function of the seed, a random model scores at chance on every offline task,
bad inputs are clear errors, and the scores land in the run record."""

import dataclasses
import json
import lzma
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from scaling.data.sources import EMBEDDED_CORPUS
from scaling.data.tokenizers import TokenizerConfig
from scaling.data.tokens import DataConfig, load_tokens
from scaling.eval import score as S
from scaling.eval import tasks as T
from scaling.eval.__main__ import main
from scaling.eval.suite import EvalSuite
from scaling.model.decoder import ModelConfig, init_params
from scaling.record import RecordError, read_record, record_row, write_record
from scaling.train.loop import train, train_runs
from test_tracking import wandb_env  # noqa: F401 (a fixture)
from test_train import tiny_config

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=257, seq_len=64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 kB of the embedded English corpus as a local file: ~37 documents, 4 of them held out."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    with lzma.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        path.write_text(f.read(300_000), encoding="utf-8")
    return path


def data_config(corpus, cache) -> DataConfig:
    return DataConfig(source="local", path=str(corpus), doc_bytes=8000, val_fraction=0.1,
                      tokenizer=TokenizerConfig(kind="bytes"), cache_dir=str(cache))


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory):
    return load_tokens(data_config(corpus, tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def held_out(data):
    return T.HeldOut.from_tokens(data)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def text_run(tmp_path, corpus, **eval_kw):
    """A 4-step run on the corpus file with the bytes tokenizer (and `eval` if given)."""
    cfg = tiny_config(tmp_path, steps=4)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=257, seq_len=64),
                               data=data_config(corpus, tmp_path / "cache"), eval=T.EvalConfig(**eval_kw))


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------
def hand_logprob(params, tokens, n_cont) -> tuple[float, bool]:
    """Sum of log softmax over the continuation by a plain, un-jitted forward; and whether each token was the argmax."""
    logits = np.asarray(CFG.build().apply({"params": params}, np.asarray(tokens[None, :-1])))[0].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    pos = np.arange(len(tokens) - 1 - n_cont, len(tokens) - 1)
    return float(logp[pos, tokens[pos + 1]].sum()), bool(np.all(logits[pos].argmax(-1) == tokens[pos + 1]))


def test_scores_equal_a_hand_computed_log_likelihood(params, held_out, data):
    task = T.build_task("cloze", held_out, seed=0, n=6)
    per_example = S.encode_rows(task, data.tokenizer, CFG.seq_len)
    rows = [r for ex in per_example for r in ex]
    logp, greedy = S.score_rows(CFG, params, rows)
    hand = [hand_logprob(params, r.tokens, r.n_cont) for r in rows]
    np.testing.assert_allclose(logp, [h[0] for h in hand], rtol=1e-5, atol=1e-4)
    assert list(greedy) == [h[1] for h in hand]
    assert any(len(r.tokens) == CFG.seq_len + 1 for r in rows)  # long contexts were cut from the left

    result = S.score_task(CFG, params, data.tokenizer, task)
    by_hand = np.array([h[0] for h in hand]).reshape(6, 4)
    golds = [ex.gold for ex in task.examples]
    lengths = np.array([[len(c) for c in ex.choices] for ex in task.examples])
    assert result["accuracy"] == pytest.approx(np.mean(by_hand.argmax(1) == golds))
    assert result["accuracy_norm"] == pytest.approx(np.mean((by_hand / lengths).argmax(1) == golds))
    assert result["logprob"] == pytest.approx(np.mean(by_hand[np.arange(6), golds]), abs=1e-4)
    assert (result["n"], result["k"], result["chance"], result["kind"]) == (6, 0, 0.25, "mc")


def test_exact_match_is_greedy_decoding_with_the_kv_cache(params, data):
    from scaling.eval.sample import generate

    prompt = data.tokenizer.encode("The king said")
    greedy = generate(CFG, params, prompt, 3, temperature=0.0)  # KV-cache decoding
    other = [(t + 1) % 256 for t in greedy]
    rows = [S.Row(np.array(prompt + greedy, np.int32), 3), S.Row(np.array(prompt + other, np.int32), 3),
            S.Row(np.array(prompt + greedy[:2] + other[2:], np.int32), 3)]
    assert list(S.score_rows(CFG, params, rows)[1]) == [True, False, False]

    # a task whose target is the model's own greedy text: both paths say it matches; a wrong target: neither
    text = data.tokenizer.decode(greedy)
    if data.tokenizer.encode(text) == greedy:  # (the bytes decode round-trips unless it cut a UTF-8 character)
        task = T.Task("t", "exact", (T.Example("The king said", target=text), T.Example("The king said", target=" zq")),
                      0, 0, 0.0)
        assert S.generate_exact(CFG, params, data.tokenizer, task) == [True, False]
        assert S.score_task(CFG, params, data.tokenizer, task)["accuracy"] == 0.5


def test_random_model_scores_at_chance_on_every_offline_task(params, held_out, data):
    n = 200
    for name in T.OFFLINE:
        task = T.build_task(name, held_out, seed=0, n=n)
        result = S.score_task(CFG, params, data.tokenizer, task)
        p = result["chance"]
        assert p == T.TASKS[name].chance
        tol = 3 * math.sqrt(p * (1 - p) / n) + 1 / n  # three binomial standard errors
        for metric in ("accuracy", "accuracy_norm"):
            if result[metric] is not None:
                assert abs(result[metric] - p) <= tol, (name, metric, result[metric], p)
        assert result["logprob"] < 0


# --------------------------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------------------------
def test_prompts_are_a_function_of_the_seed(held_out):
    for name in T.OFFLINE:
        a = T.build_task(name, held_out, seed=0, k=2, n=8)
        assert a.examples == T.build_task(name, held_out, seed=0, k=2, n=8).examples
        assert a.examples[:3] == T.build_task(name, held_out, seed=0, k=2, n=3).examples  # limit takes a prefix
        assert a.examples != T.build_task(name, held_out, seed=1, k=2, n=8).examples
        assert all(len(ex.shots) == 2 for ex in a.examples) and a.k == 2
        assert T.build_task(name, held_out, n=4).k == T.TASKS[name].shots


def test_offline_tasks_are_built_as_documented(held_out):
    cloze = T.build_task("cloze", held_out, n=50)
    for ex in cloze.examples:
        assert len({c.lower() for c in ex.choices}) == T.CLOZE_CHOICES and all(c.startswith(" ") for c in ex.choices)
        assert any(ex.context + ex.answer in doc for doc in held_out.documents)  # the true next word, held out
    assert {ex.gold for ex in cloze.examples} == set(range(T.CLOZE_CHOICES))
    spelling = T.build_task("spelling", held_out, n=50)
    for ex in spelling.examples:
        assert len(set(ex.choices)) == T.SPELLING_CHOICES and any(ex.context + ex.answer in d for d in held_out.documents)
        assert {sorted(c) == sorted(ex.answer) and c[:2] == ex.answer[:2] for c in ex.choices} == {True}
    assert {ex.gold for ex in spelling.examples} == set(range(T.SPELLING_CHOICES))


def test_spelling_choices_have_the_right_words_token_count_under_a_subword_tokenizer():
    # A random model prefers the choice of fewest tokens (each costs ~ln V nats): a subword tokenizer encodes a known
    # word in one token and its misspellings in many, so such words must not be drawn. Toy tokenizer: a known word is
    # one token, anything else one token per character.
    known = {" walked", " people"}
    encode = lambda text: [text] if text in known else list(text)  # noqa: E731
    src = T.HeldOut(["x " * 30 + "the people walked along narrow roads to markets " * 5], "toy", encode=encode)
    task = T.build_task("spelling", src, n=30)
    for ex in task.examples:
        assert len({len(encode(c)) for c in ex.choices}) == 1 and ex.answer not in known, ex.choices
    only_known = T.HeldOut(["x " * 30 + "the people walked " * 20], "toy", encode=encode)
    with pytest.raises(ValueError, match="no held-out word has enough misspellings of its own token count"):
        T.build_task("spelling", only_known, n=1)


def test_kv_recall_and_the_others_are_built_as_documented(held_out):
    kv = T.build_task("kv_recall", None, n=20)
    for ex in kv.examples:
        key = ex.context.split()[-1]
        assert f"{key}{ex.answer}" in ex.context.split() and len(set(ex.choices)) == T.KV_PAIRS
    copy = T.build_task("copy", held_out, n=20)
    for ex in copy.examples:
        first, again = ex.context.split(". ")
        assert first.startswith(again) and first.split()[len(again.split())] == ex.target.strip()
    pattern = T.build_task("pattern", None, n=20)
    ex = pattern.examples[0]
    assert len(ex.shots) == 3 and len(set(ex.choices)) == T.PATTERN_RULES and ex.prompt().count("\n") == 3


def test_unknown_task_and_bad_settings_are_clear_errors(held_out):
    with pytest.raises(ValueError, match=r"unknown task 'nope': choose among cloze, spelling, kv_recall, copy, pattern"):
        T.build_task("nope", held_out)
    with pytest.raises(ValueError, match=r"eval.tasks=\['cloze', 'nope'\]: unknown task 'nope'"):
        T.EvalConfig(tasks=["cloze", "nope"])
    with pytest.raises(ValueError, match="eval.limit=0 is invalid"):
        T.EvalConfig(tasks=["cloze"], limit=0)
    with pytest.raises(ValueError, match="shots=-1 is invalid"):
        T.build_task("kv_recall", None, k=-1)
    with pytest.raises(ValueError, match="task cloze is built from held-out documents"):
        T.build_task("cloze", None)
    assert T.parse_tasks("offline,cloze") == list(T.OFFLINE)


def test_shots_larger_than_the_context_are_refused(held_out, data):
    task = T.build_task("kv_recall", None, k=8, n=3)  # ~20 byte tokens per shot: 8 shots overflow 64 tokens
    with pytest.raises(ValueError, match=r"--shots 8 does not fit task kv_recall: example 0 .* more than the model's "
                                         r"context \(seq_len=64\) \+ 1; use --shots 2 or fewer"):
        S.encode_rows(task, data.tokenizer, CFG.seq_len)
    S.encode_rows(T.build_task("kv_recall", None, k=2, n=3), data.tokenizer, CFG.seq_len)  # what it advised fits
    long = T.Task("long", "exact", (T.Example("x", target=" " + "word " * 20),), 0, 0, 0.0)
    with pytest.raises(ValueError, match=r"task long example 0: the answer .* is 101 tokens, more than the model's "
                                         r"context \(seq_len=64\) holds"):
        S.encode_rows(long, data.tokenizer, CFG.seq_len)


def test_tokenizer_mismatch_between_task_and_run_is_refused(held_out, data, params, tmp_path):
    task = dataclasses.replace(T.build_task("cloze", held_out, n=2), tokenizer="bpe4096-000000000000")
    with pytest.raises(ValueError, match="tokenizer mismatch: task cloze was built from held-out documents tokenized "
                                         "by bpe4096-000000000000, but the model reads bytes-"):
        S.score_task(CFG, params, data.tokenizer, task)
    synthetic = load_tokens(tiny_config(tmp_path).data)
    with pytest.raises(ValueError, match="data.source=synthetic, which has no text"):
        T.HeldOut.from_tokens(synthetic)


def test_benchmarks_load_through_datasets_and_say_offline_what_to_use(monkeypatch, tmp_path):
    rows = {
        "hellaswag": [{"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he", "label": "2",
                       "endings": ["sings [title] loudly.", "flies.", "puts them in a pan.", "sleeps."]}] * 3,
        "arc_easy": [{"question": "What is ice?", "answerKey": "B",
                      "choices": {"label": ["A", "B", "C"], "text": ["gas", "solid water", "fire"]}},
                     {"question": "Sun?", "answerKey": "1",
                      "choices": {"label": ["1", "2", "3", "4"], "text": ["star", "rock", "moon", "sea"]}}],
        "piqa": [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the jar", "label": 0}] * 2,
        "lambada": [{"text": "she opened the door and saw her mother"}] * 2,
    }
    asked = []

    def fake_load(source, cache_dir):
        asked.append((source.path, cache_dir))
        return rows[next(n for n, s in T.TASKS.items() if s.hf is source)]

    monkeypatch.setattr(T, "load_hf_rows", fake_load)
    hs = T.build_task("hellaswag", None, n=2, k=1, cache_dir=tmp_path)
    assert hs.examples[0].choices[0] == " sings. loudly." and hs.examples[0].gold == 2 and hs.chance == 0.25
    assert hs.examples[0].context == "Cooking: A man cuts onions. He" and len(hs.examples[0].shots) == 1
    assert asked[0] == ("Rowan/hellaswag", tmp_path / "hf")
    monkeypatch.setenv("SCALING_CACHE", str(tmp_path / "root"))  # no cache_dir: the project's cache root
    T.build_task("hellaswag", None, n=2, k=1)
    assert asked[-1] == ("Rowan/hellaswag", tmp_path / "root" / "hf")
    arc = T.build_task("arc_easy", None, n=2)
    assert arc.chance == pytest.approx((1 / 3 + 1 / 4) / 2)
    assert {ex.answer for ex in arc.examples} == {" solid water", " star"}
    assert T.build_task("piqa", None, n=2).examples[0].choices == (" twist the lid", " eat the jar")
    lam = T.build_task("lambada", None, n=1)
    assert (lam.kind, lam.examples[0].target, lam.examples[0].context) == ("exact", " mother",
                                                                          "she opened the door and saw her")

    def offline(source, cache_dir):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(T, "load_hf_rows", offline)
    with pytest.raises(ValueError, match=r"task hellaswag needs the Hugging Face dataset Rowan/hellaswag .* this "
                                         r"machine seems offline. Offline, use the suite that ships with the package: "
                                         r"--tasks cloze,spelling,kv_recall,copy,pattern"):
        T.build_task("hellaswag", None)


# --------------------------------------------------------------------------------------------------------------------
# Record, CLI, training loop
# --------------------------------------------------------------------------------------------------------------------
def test_record_validates_eval_and_flattens_it_into_columns(tmp_path):
    rec = json.loads((Path(__file__).parent / "data" / "record_v1.json").read_text())
    scores = {"accuracy": 0.5, "accuracy_norm": None, "logprob": -3.2, "n": 10, "k": 0, "chance": 0.25, "kind": "exact"}
    written = write_record(tmp_path, {**rec, "eval": {"copy": scores}})
    row = record_row(written, tmp_path)
    assert (row["eval_copy_acc"], row["eval_copy_acc_norm"], row["eval_copy_logprob"], row["eval_copy_chance"]) == (
        0.5, None, -3.2, 0.25)
    assert list(row)[-4:] == ["eval_copy_acc", "eval_copy_acc_norm", "eval_copy_logprob", "eval_copy_chance"]
    with pytest.raises(RecordError, match=r"field 'eval.copy.accuracy' is 'x', expected a number; re-evaluate"):
        write_record(tmp_path, {**rec, "eval": {"copy": {**scores, "accuracy": "x"}}})
    with pytest.raises(RecordError, match=r"field 'eval.copy.kind' is missing"):
        write_record(tmp_path, {**rec, "eval": {"copy": {k: v for k, v in scores.items() if k != "kind"}}})
    assert read_record(tmp_path)["eval"]["copy"] == scores  # the refused writes left the good record


@pytest.mark.slow
def test_cli_writes_eval_into_the_record_and_collect_keeps_it(tmp_path, corpus, capsys):
    from scaling.sweep.schedule import collect

    run = tmp_path / "sweep" / "run"
    before = train(text_run(tmp_path, corpus), run)
    assert "eval" not in before  # eval is off by default
    assert main([str(run), "--tasks", "cloze,kv_recall", "--limit", "12"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["task", "kind", "n", "k", "chance", "acc", "acc_norm", "logprob"]
    assert out.splitlines()[1].split()[:5] == ["cloze", "mc", "12", "0", "0.250"]
    rec = read_record(run)
    assert set(rec["eval"]) == {"cloze", "kv_recall"} and rec["eval"]["cloze"]["n"] == 12
    assert {k: v for k, v in rec.items() if k not in ("eval", "schema_version")} == {
        k: v for k, v in before.items() if k != "schema_version"}  # nothing else changed
    assert main([str(run), "--tasks", "copy", "--limit", "5", "--seed", "3"]) == 0
    assert set(read_record(run)["eval"]) == {"cloze", "kv_recall", "copy"}  # merged, not replaced
    df = collect(tmp_path / "sweep")
    assert {"eval_cloze_acc", "eval_copy_logprob", "eval_kv_recall_chance"} <= set(df.columns)
    assert df.loc[0, "eval_kv_recall_chance"] == 0.25

    rec["tokenizer"]["identity"] = "bytes-000000000000"
    (run / "record.json").write_text(json.dumps(rec))
    assert main([str(run), "--tasks", "cloze"]) == 2
    assert "tokenizer mismatch: the run was trained with bytes-000000000000" in capsys.readouterr().err
    assert main([str(run), "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_a_completed_run_is_not_scored_from_an_older_checkpoint_than_its_last(tmp_path, corpus, capsys):
    """Its final checkpoint corrupt, the newest intact one is older: scores of that model would have sat in the record
    beside the final model's losses (they were written, with a log warning only)."""
    from scaling.eval.sample import main as sample_main
    from scaling.train.checkpoint import CheckpointConfig

    cfg = text_run(tmp_path, corpus)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint=CheckpointConfig(every=2, keep=2)))
    run = tmp_path / "run"
    final_loss = train(cfg, run)["loss"]
    biggest = max((p for p in (run / "checkpoints" / "4").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    before = (run / "record.json").read_bytes()
    assert main([str(run), "--tasks", "cloze", "--limit", "4"]) == 2
    err = capsys.readouterr().err
    assert "completed at step 4 but its newest intact checkpoint is step 2" in err, err
    assert "Delete its record.json and relaunch the run: it resumes from step 2" in err
    assert (run / "record.json").read_bytes() == before
    assert (run / "checkpoints" / "4.corrupt").is_dir()  # set aside, not deleted
    sample_main([str(run), "--prompt", "a", "--max-new-tokens", "2", "--temperature", "0"])
    assert "note: sampling from checkpoint step 2, not the completed run's final step 4" in capsys.readouterr().err
    # What the message says to do: the relaunch retrains steps 3-4 bit for bit, then the run scores.
    (run / "record.json").unlink()
    assert train(cfg, run)["loss"] == final_loss
    assert main([str(run), "--tasks", "cloze", "--limit", "4"]) == 0


def test_python_m_scaling_evaluate_is_the_eval_cli():
    import scaling.evaluate

    assert scaling.evaluate.main is main


@pytest.mark.slow
def test_eval_config_scores_a_run_at_its_end_and_at_its_evaluation_steps(tmp_path, corpus):
    record = train(text_run(tmp_path, corpus, tasks=["kv_recall", "pattern"], limit=8, every_eval=True), tmp_path / "r")
    assert set(record["eval"]) == {"kv_recall", "pattern"} and record["eval"]["pattern"]["k"] == 3
    assert read_record(tmp_path / "r")["eval"] == record["eval"]
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "eval_loss" in r]
    assert scored and all("eval_pattern_acc" in r and "eval_kv_recall_logprob" in r for r in scored)
    assert scored[-1]["eval_pattern_logprob"] == pytest.approx(record["eval"]["pattern"]["logprob"])


def test_eval_config_refuses_a_synthetic_run_before_training(tmp_path):
    cfg = dataclasses.replace(tiny_config(tmp_path), eval=T.EvalConfig(tasks=["cloze"]))
    with pytest.raises(ValueError, match="no text"):
        train(cfg, tmp_path / "run")
    assert read_record(tmp_path / "run")["status"] == "failed"


@pytest.mark.slow
def test_eval_scores_each_run_of_a_vmapped_group(tmp_path, corpus):
    cfg = text_run(tmp_path, corpus, tasks=["kv_recall"], limit=16)
    cfgs = [dataclasses.replace(cfg, name=f"lr{i}", optim=dataclasses.replace(cfg.optim, lr=lr))
            for i, lr in enumerate((1e-2, 1e-3))]
    records = train_runs(cfgs, [tmp_path / "a", tmp_path / "b"])
    alone = train(dataclasses.replace(cfgs[1], name="alone"), tmp_path / "alone")
    assert records[0]["eval"]["kv_recall"]["logprob"] != records[1]["eval"]["kv_recall"]["logprob"]
    assert records[1]["eval"]["kv_recall"]["logprob"] == pytest.approx(alone["eval"]["kv_recall"]["logprob"], abs=1e-3)
    # Scored afterwards from the group's checkpoint (a member's run dir holds none: "the run saved none yet" before).
    assert not (tmp_path / "b" / "checkpoints").exists()
    for k, member in enumerate(("a", "b")):
        assert main([str(tmp_path / member), "--tasks", "kv_recall", "--limit", "16"]) == 0
        scored, at_end = read_record(tmp_path / member)["eval"]["kv_recall"], records[k]["eval"]["kv_recall"]
        assert (scored["logprob"], scored["accuracy"]) == pytest.approx((at_end["logprob"], at_end["accuracy"]), rel=1e-6)


def test_suite_encodes_once_and_scores_any_params(data, params):
    suite = EvalSuite(T.EvalConfig(tasks=["offline"], limit=4), CFG, data)
    assert [t.name for t in suite.tasks] == list(T.OFFLINE)
    a, b = suite(params), suite(init_params(CFG, jax.random.key(1)))
    assert a.keys() == b.keys() and a["cloze"]["logprob"] != b["cloze"]["logprob"]


@pytest.mark.slow
def test_cli_mirrors_the_scores_into_the_runs_wandb_summary(wandb_env, corpus):
    from test_tracking import inspect_summary, run_files

    from scaling.train.tracking import LoggingConfig

    run = wandb_env / "run"
    cfg = dataclasses.replace(text_run(wandb_env, corpus), logging=LoggingConfig(backend="wandb", wandb_mode="offline",
                                                                                progress="none"))
    train(cfg, run)
    (trained,) = run_files(run)
    assert main([str(run), "--tasks", "kv_recall", "--limit", "8"]) == 0
    (evaluated,) = [p for p in run_files(run) if p != trained]
    summary, _ = inspect_summary(evaluated)
    scores = read_record(run)["eval"]["kv_recall"]
    assert summary["run_id"] == (run / "wandb_id").read_text().strip()  # the run's own wandb run, continued
    assert summary["summary"]["eval_kv_recall_acc"] == pytest.approx(scores["accuracy"])
    assert summary["summary"]["eval_kv_recall_chance"] == 0.25 and summary["summary"]["status"] == "completed"

import json

import jax
import pytest

from scaling.model.decoder import ModelConfig, init_params
from scaling.eval.sample import generate, load_run, main
from scaling.train.loop import train
from test_train import tiny_config

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=40, seq_len=24, pos_encoding="rotary")


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def test_greedy_is_deterministic_and_cache_equals_recompute(params):
    prompt = [1, 2, 3, 4, 5]
    cached = generate(CFG, params, prompt, 12, temperature=0.0)
    assert cached == generate(CFG, params, prompt, 12, temperature=0.0, seed=99)  # the seed plays no part
    assert cached == generate(CFG, params, prompt, 12, temperature=0.0, use_cache=False)
    assert len(cached) == 12 and all(0 <= t < CFG.vocab_size for t in cached)


def test_sampling_with_cache_equals_recompute_for_the_same_seed(params):
    prompt = [7, 8, 9]
    a = generate(CFG, params, prompt, 10, temperature=1.0, top_k=5, seed=3)
    assert a == generate(CFG, params, prompt, 10, temperature=1.0, top_k=5, seed=3, use_cache=False)
    assert a != generate(CFG, params, prompt, 10, temperature=1.0, top_k=5, seed=4)


def test_top_k_of_the_whole_vocabulary_truncates_nothing(params):
    full = generate(CFG, params, [2, 3], 8, temperature=1.0, seed=1)
    assert generate(CFG, params, [2, 3], 8, temperature=1.0, top_k=CFG.vocab_size + 10, seed=1) == full


def test_top_k_one_is_greedy(params):
    prompt = [3, 1, 4]
    assert generate(CFG, params, prompt, 8, temperature=1.5, top_k=1, seed=5) == generate(
        CFG, params, prompt, 8, temperature=0.0
    )


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(temperature=-1.0), "temperature=-1.0 is invalid"),
        (dict(top_k=0), "top_k=0 is invalid"),
        (dict(max_new_tokens=24), "max_new_tokens=24 must be below the model's seq_len=24"),
    ],
)
def test_bad_arguments_raise_clear_errors(params, kw, message):
    args = dict(max_new_tokens=4, temperature=1.0)
    args.update(kw)
    with pytest.raises(ValueError, match=message):
        generate(CFG, params, [1, 2], **args)
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate(CFG, params, [], 4)


def test_cli_samples_from_a_trained_run_and_refuses_a_tokenizer_mismatch(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(tmp_path), run)
    cfg, loaded = load_run(run)
    assert cfg.name == "tiny" and "wte" in loaded
    main([str(run), "--max-new-tokens", "5", "--temperature", "0"])
    first = capsys.readouterr().out
    main([str(run), "--max-new-tokens", "5", "--temperature", "0"])
    assert capsys.readouterr().out == first and "--- sample 0 ---" in first

    record = json.loads((run / "record.json").read_text())
    record["tokenizer"]["identity"] = "bpe4096-000000000000"
    (run / "record.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit):
        main([str(run), "--max-new-tokens", "5"])
    assert "tokenizer mismatch" in capsys.readouterr().err

    (run / "record.json").write_text('{"status": "compl')  # a record cut off mid-write: one clear error, not a traceback
    with pytest.raises(SystemExit):
        main([str(run), "--max-new-tokens", "5"])
    err = capsys.readouterr().err
    assert "record.json" in err and "Traceback" not in err, err


def test_cli_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "is not a run directory" in capsys.readouterr().err


def test_cli_refuses_a_prompt_longer_than_the_context_unless_told_to_truncate(tmp_path, capsys):
    """A prompt past seq_len - max_new_tokens was cut silently; now refused, or cut with --truncate-prompt, said."""
    import dataclasses

    from scaling.data.tokens import DataConfig
    from scaling.data.tokenizers import TokenizerConfig

    (tmp_path / "corpus.txt").write_text("\n\n".join(f"paragraph {i} of a tiny corpus." for i in range(40)))
    cfg = tiny_config(tmp_path, steps=4)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, vocab_size=257),
        data=DataConfig(source="local", path=str(tmp_path / "corpus.txt"), doc_bytes=0, val_fraction=0.1,
                        tokenizer=TokenizerConfig(kind="bytes"), cache_dir=str(tmp_path / "cache")))
    run = tmp_path / "run"
    train(cfg, run)
    prompt = "abcdefghijklmnopqrst"  # 20 byte tokens; seq_len 16 - 4 new tokens leaves room for 12
    with pytest.raises(SystemExit) as exc:
        main([str(run), "--prompt", prompt, "--max-new-tokens", "4", "--temperature", "0"])
    assert exc.value.code == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.splitlines() == [
        "error: the prompt is 20 tokens, but the model's context (seq_len=16) holds at most 12 prompt tokens with "
        "max_new_tokens=4: shorten the prompt, lower --max-new-tokens, or pass --truncate-prompt to keep its last 12 "
        "tokens."]
    main([str(run), "--prompt", prompt, "--max-new-tokens", "4", "--temperature", "0", "--truncate-prompt"])
    out = capsys.readouterr()
    assert out.err == ("note: --truncate-prompt: the prompt is 20 tokens; kept its last 12 (seq_len 16 - "
                       "max_new_tokens 4)\n")
    assert out.out.startswith("--- sample 0 ---\nijklmnopqrst")  # the text the model saw, then its continuation

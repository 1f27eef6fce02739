"""Data path: sources, token cache (reuse, rebuild, concurrency, atomicity), split, stateless sampler, errors."""
import gzip
import json
import lzma
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from scaling.data import cache
from scaling.data.tokens import DataConfig, TokenData, load_tokens, main
from scaling.data.synthetic import MarkovChain, SyntheticConfig
from scaling.data.tokenizers import TokenizerConfig, bytes_tokenizer

REPO = Path(__file__).resolve().parents[1]
BYTES = TokenizerConfig(kind="bytes")


def marker_docs(n: int) -> list[str]:
    # every document is made of its own marker, so a token window reveals which document it came from
    return [(f"<doc{i:03d}> " * 40).strip() for i in range(n)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def cfg_for(path: Path, tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("tokenizer", BYTES)
    return DataConfig(source="local", path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


@pytest.fixture
def markers(tmp_path):
    return load_tokens(cfg_for(write_jsonl(tmp_path / "m.jsonl", marker_docs(40)), tmp_path, val_fraction=0.1))


def test_split_is_by_document_and_val_never_in_train(markers):
    val_idx = markers.meta["split"]["val_doc_indices"]
    assert val_idx == [9, 19, 29, 39] and markers.meta["train_docs"] == 36
    train_text = markers.tokenizer.decode(markers.train)
    val_text = markers.tokenizer.decode(markers.val)
    for i in range(40):
        assert (f"<doc{i:03d}>" in val_text) == (i in val_idx)
        assert (f"<doc{i:03d}>" in train_text) == (i not in val_idx)
    seen = "".join(markers.tokenizer.decode(row) for s in range(50) for row in markers.train_batch(0, s, 8, 64))
    assert "<doc" in seen and not any(f"<doc{i:03d}>" in seen for i in val_idx)
    # documents end with the end-of-text token
    assert int(np.sum(markers.train == markers.tokenizer.eot)) == 36


def test_train_batch_is_pure_function_of_seed_and_step(markers):
    b = markers.train_batch(seed=3, step=7, batch_size=4, seq_len=32)
    assert b.shape == (4, 33) and b.dtype == np.int32
    assert np.array_equal(b, markers.train_batch(3, 7, 4, 32))
    assert not np.array_equal(b, markers.train_batch(3, 8, 4, 32))
    assert not np.array_equal(b, markers.train_batch(4, 7, 4, 32))
    code = (
        "import json,sys; from scaling.data.tokens import *; from scaling.data.tokenizers import TokenizerConfig\n"
        f"d = load_tokens(DataConfig(source='local', path={markers.meta['source_description']!r}, "
        f"cache_dir={str(markers.folder.parents[1])!r}, val_fraction=0.1, tokenizer=TokenizerConfig(kind='bytes')))\n"
        "print(json.dumps(d.train_batch(3, 7, 4, 32).tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert np.array_equal(np.array(json.loads(out.stdout)), b)


def test_val_batches_fixed_and_from_val(markers):
    first = list(markers.val_batches(n_tokens=256, batch_size=2, seq_len=16))
    assert len(first) == 8 and all(x.shape == (2, 17) for x in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, markers.val_batches(256, 2, 16)))
    text = "".join(markers.tokenizer.decode(r) for x in first for r in x)
    assert "<doc009>" in text and "<doc000>" not in text


def test_epochs_counted_and_warned_once(markers):
    n = len(markers.train)
    assert markers.epochs(n // 2) == pytest.approx(0.5)
    with pytest.warns(UserWarning, match="repeated"):
        assert markers.epochs(3 * n) == pytest.approx(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        markers.epochs(4 * n)  # no second warning


def test_corpus_smaller_than_one_batch(markers):
    with pytest.raises(ValueError, match="fewer than one batch"):
        markers.train_batch(0, 0, batch_size=1000, seq_len=1024)


def test_cache_reused_without_second_tokenization(markers, monkeypatch):
    def no_tokenizing(*a, **k):
        raise AssertionError("the cache must be reused")

    monkeypatch.setattr(cache, "tokenize_source", no_tokenizing)
    again = load_tokens(cfg_for(Path(markers.meta["source_description"]), markers.folder.parents[2], val_fraction=0.1))
    assert again.folder == markers.folder and again.meta["created"] == markers.meta["created"]
    assert np.array_equal(again.train, markers.train)


def test_cache_rebuilt_when_tokenizer_changes_and_refused_for_other_tokenizer(markers):
    cfg = cfg_for(Path(markers.meta["source_description"]), markers.folder.parents[2], val_fraction=0.1,
                  tokenizer=TokenizerConfig(kind="chars", vocab_size=300))
    other = load_tokens(cfg)
    assert other.folder != markers.folder and other.meta["tokenizer"] == other.tokenizer.identity
    assert other.meta["tokenizer"] != markers.meta["tokenizer"]
    with pytest.raises(ValueError, match="built with tokenizer bytes-"):
        TokenData(markers.folder, other.tokenizer)


def test_concurrent_builds_make_one_valid_cache(tmp_path):
    src = tmp_path / "big.txt"
    src.write_text("\n\n".join(f"paragraph {i} " + "lorem ipsum dolor sit amet " * 200 for i in range(400)))
    code = (
        "import json; from scaling.data.tokens import *; from scaling.data.tokenizers import TokenizerConfig\n"
        f"d = load_tokens(DataConfig(source='local', path={str(src)!r}, cache_dir={str(tmp_path / 'c')!r}, "
        "doc_bytes=4096, tokenizer=TokenizerConfig(kind='bytes')))\n"
        "print(json.dumps([str(d.folder), d.meta['builder_pid'], int(d.train.sum())]))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({tuple(r) for r in results}) == 1  # same folder, one builder, same tokens
    assert results[0][1] in [p.pid for p in procs]
    folders = [p for p in (tmp_path / "c" / "tokens").iterdir() if p.is_dir()]
    assert len(folders) == 1 and ".tmp-" not in folders[0].name
    cache.read_meta(folders[0])


def test_local_formats_give_the_same_documents(tmp_path):
    texts = ["Alpha beta.\nGamma.", "Δέλτα ε", "zeta eta theta", "iota"]
    plain = "\n\n".join(texts)
    (tmp_path / "a.txt").write_text(plain, encoding="utf-8")
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(plain.encode()))
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(plain.encode()))
    write_jsonl(tmp_path / "a.jsonl", texts, field="body")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet")
    outs = []
    for name in ("a.txt", "a.txt.xz", "a.txt.gz", "a.jsonl", "a.parquet"):
        d = load_tokens(cfg_for(tmp_path / name, tmp_path, text_field="body", doc_bytes=0, val_fraction=0.5))
        outs.append((d.meta["documents"], d.tokenizer.decode(d.train), d.tokenizer.decode(d.val)))
    assert outs[0][0] == 4 and "zeta" in outs[0][1] and "Δέλτα" in outs[0][2] and "iota" in outs[0][2]
    assert all(o == outs[0] for o in outs)


def test_glob_and_max_bytes(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / f"part{i}.jsonl", [f"file {i} doc {j} " * 10 for j in range(5)])
    d = load_tokens(cfg_for(tmp_path / "part*.jsonl", tmp_path))
    assert d.meta["documents"] == 15 and "file 2 doc 4" in d.tokenizer.decode(d.val)
    small = load_tokens(cfg_for(tmp_path / "part*.jsonl", tmp_path, max_bytes=1000))
    assert small.meta["bytes"] == 1000 and small.folder != d.folder


def test_hf_datasets_loader_on_local_file(tmp_path):
    path = write_jsonl(tmp_path / "hf.jsonl", marker_docs(10))
    hf = load_tokens(DataConfig(source="hf", hf_name="json", path=str(path), val_fraction=0.2, tokenizer=BYTES,
                                cache_dir=str(tmp_path / "cache")))
    local = load_tokens(cfg_for(path, tmp_path, val_fraction=0.2))
    assert np.array_equal(hf.train, local.train) and np.array_equal(hf.val, local.val)
    streamed = load_tokens(DataConfig(source="hf", hf_name="json", path=str(path), val_fraction=0.2, tokenizer=BYTES,
                                      hf_streaming=True, cache_dir=str(tmp_path / "cache")))
    assert np.array_equal(streamed.train, local.train) and streamed.folder != hf.folder
    with pytest.raises(ValueError, match="no column 'content'"):
        load_tokens(DataConfig(source="hf", hf_name="json", path=str(path), text_field="content", tokenizer=BYTES,
                               cache_dir=str(tmp_path / "cache")))


def test_embedded_corpus_default_with_trained_bpe(tmp_path):
    d = load_tokens(DataConfig(max_bytes=200_000, doc_bytes=8192, cache_dir=str(tmp_path),
                               tokenizer=TokenizerConfig(vocab_size=300)))
    assert d.vocab_size == 300 and d.meta["dtype"] == "uint16" and d.meta["source"].startswith("embedded:")
    assert d.meta["bytes"] == 200_000 and len(d.val) > 0
    assert 0 < d.unigram_entropy() < np.log(300)


def test_synthetic_empirical_entropy_matches_exact(tmp_path):
    cfg = SyntheticConfig(vocab_size=8, order=1, concentration=0.5, n_tokens=400_000, seed=1)
    d = load_tokens(DataConfig(source="synthetic", synthetic=cfg, cache_dir=str(tmp_path)))
    chain = MarkovChain(cfg)
    assert d.entropy_rate == pytest.approx(chain.entropy_rate) and d.vocab_size == 9
    x = np.asarray(d.train, dtype=np.int64)
    pair = np.bincount(x[:-1] * 8 + x[1:], minlength=64).reshape(8, 8).astype(float)
    p_next = pair / pair.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h_empirical = -np.nansum(pair / pair.sum() * np.log(p_next))
    assert h_empirical == pytest.approx(chain.entropy_rate, abs=0.01)
    assert -np.log(chain.P_SxV[x[:-1], x[1:]]).mean() == pytest.approx(chain.entropy_rate, abs=0.01)
    # a second chain with less context for the first target has a higher window floor
    chain2 = MarkovChain(SyntheticConfig(vocab_size=8, order=2, concentration=0.5))
    assert chain2.loss_floor(4) > chain2.entropy_rate == pytest.approx(chain2.loss_floor(10**6), abs=1e-5)


def test_bad_files_raise_clear_errors_and_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_tokens(cfg_for(tmp_path / "missing.txt", tmp_path))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_tokens(cfg_for(tmp_path / "empty.txt", tmp_path))
    (tmp_path / "blank.txt").write_text("\n\n  \n\n")
    with pytest.raises(ValueError, match="no documents"):
        load_tokens(cfg_for(tmp_path / "blank.txt", tmp_path))
    with pytest.raises(ValueError, match="matches no file"):
        load_tokens(cfg_for(tmp_path / "*.nothing", tmp_path))
    (tmp_path / "latin1.txt").write_bytes("good line\nna\xefve caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not valid UTF-8 at byte 12 \(line 2\)"):
        load_tokens(cfg_for(tmp_path / "latin1.txt", tmp_path))
    write_jsonl(tmp_path / "t.jsonl", ["a", "b"], field="content")
    with pytest.raises(ValueError, match=r"t.jsonl:1: no text field 'text' \(found \['content', 'id'\]\)"):
        load_tokens(cfg_for(tmp_path / "t.jsonl", tmp_path))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['content'\]\)"):
        load_tokens(cfg_for(tmp_path / "t.parquet", tmp_path))
    (tmp_path / "one.txt").write_text("a single paragraph")
    with pytest.raises(ValueError, match="only 1 document"):
        load_tokens(cfg_for(tmp_path / "one.txt", tmp_path))
    tokens = tmp_path / "cache" / "tokens"
    assert not tokens.exists() or not [p for p in tokens.iterdir() if p.is_dir()]  # nothing half-written


def test_corrupt_cache_is_refused(markers):
    with open(markers.folder / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="corrupt token cache"):
        TokenData(markers.folder, bytes_tokenizer())


def test_same_size_corruption_and_an_edited_meta_are_refused(markers):
    folder, tok = markers.folder, bytes_tokenizer()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["integrity"]["train"]["max_id"] == int(np.asarray(markers.train).max()) < tok.n_vocab
    train = np.fromfile(folder / "train.bin", dtype=meta["dtype"])
    # an id outside the vocabulary, file size unchanged: it would train to NaN and read as a diverged run
    bad = train.copy()
    bad[5] = 60000
    bad.tofile(folder / "train.bin")
    with pytest.raises(ValueError, match=r"train.bin changed after the cache was built .*largest token id 60000"):
        TokenData(folder, tok)
    # a cache from before the integrity field: the ids are still checked against the vocabulary
    legacy = {k: v for k, v in meta.items() if k != "integrity"}
    (folder / "meta.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match=r"train.bin holds token id 60000, outside the vocabulary of 257"):
        TokenData(folder, tok)
    train.tofile(folder / "train.bin")
    TokenData(folder, tok)  # repaired: accepted
    (folder / "meta.json").write_text(json.dumps({**meta, "n_vocab": 50000}))
    with pytest.raises(ValueError, match=r"meta.json: n_vocab is 50000, but its tokenizer has 257"):
        TokenData(folder, tok)


def test_config_errors():
    with pytest.raises(ValueError, match="data.source='s3'"):
        DataConfig(source="s3")
    with pytest.raises(ValueError, match="data.path is required"):
        DataConfig(source="local")
    with pytest.raises(ValueError, match="data.val_fraction=0.9"):
        DataConfig(val_fraction=0.9)
    with pytest.raises(ValueError, match="synthetic.order=9"):
        SyntheticConfig(order=9)


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_CACHE", str(tmp_path / "env"))
    assert DataConfig().resolved_cache_dir() == tmp_path / "env"
    assert DataConfig(cache_dir=str(tmp_path / "x")).resolved_cache_dir() == tmp_path / "x"


def test_cli_prints_counts_and_cache_path(tmp_path, capsys):
    path = write_jsonl(tmp_path / "cli.jsonl", marker_docs(20))
    main(["--source", "local", "--path", str(path), "--tokenizer", "bytes", "--cache-dir", str(tmp_path / "c"),
          "--val-fraction", "0.1"])
    out = capsys.readouterr().out
    assert "18 train + 2 val" in out and "tokens/s" in out and "unigram H" in out and str(tmp_path / "c") in out
    with pytest.raises(SystemExit) as exit_:
        main(["--source", "local", "--path", str(tmp_path / "nope.txt"), "--cache-dir", str(tmp_path / "c")])
    assert exit_.value.code == 2  # a bad input, as every command of the package
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.path=") and "no such file" in err[0], err

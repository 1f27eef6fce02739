"""Tokenizers: lossless round trips, trained BPE == its tiktoken reload == HF's own encoding, identities, errors."""
from pathlib import Path

import pytest
import tiktoken

from scaling.data import tokenizers as tok
from scaling.data.sources import embedded_source
from scaling.data.tokenizers import TokenizerConfig, build_tokenizer, check_vocab

UNICODE = (Path(__file__).parent / "data" / "data_unicode.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def corpus():
    # ~300 KB of the embedded corpus, in 8 KiB documents: enough to train a small BPE in well under a second
    return embedded_source(max_bytes=300_000, doc_bytes=8192)


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("tokcache")
    return build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=512), corpus, cache), cache


@pytest.mark.parametrize("kind", ["bytes", "chars", "bpe"])
def test_round_trip_unicode(kind, corpus, bpe):
    t = bpe[0] if kind == "bpe" else build_tokenizer(TokenizerConfig(kind=kind, vocab_size=400), corpus, Path("."))
    ids = t.encode(UNICODE)
    assert t.decode(ids) == UNICODE
    assert max(ids) < t.n_vocab and t.eot == t.n_vocab - 1 and t.eot not in ids
    assert t.encode_batch([UNICODE, "abc"]) == [ids, t.encode("abc")]


def test_bytes_are_utf8_bytes():
    t = tok.bytes_tokenizer()
    assert t.n_vocab == 257 and t.encode("aé") == [97, 0xC3, 0xA9]


def test_chars_one_token_per_corpus_character(tmp_path):
    from scaling.data.sources import local_source

    (tmp_path / "c.txt").write_text("café naïve déjà ’quoted’\n\n" * 20, encoding="utf-8")
    t = build_tokenizer(TokenizerConfig(kind="chars", vocab_size=300), local_source(str(tmp_path / "c.txt")), tmp_path)
    for ch in "éï’à":
        assert len(t.encode(ch)) == 1, ch
    assert len(t.encode("漢")) == 3  # unseen character: falls back to its 3 UTF-8 bytes
    assert t.decode(t.encode("漢é")) == "漢é"


def test_bpe_has_requested_vocab_and_compresses(bpe, corpus):
    t = bpe[0]
    assert t.n_vocab == 512 and t.identity.startswith("bpe512-") and t.kind == "bpe"
    text = next(iter(corpus.documents()))
    assert len(text.encode()) / len(t.encode(text)) > 2.0  # bytes would be 1.0


def test_bpe_reload_equals_trained(bpe, corpus, monkeypatch):
    trained, cache = bpe
    ranks, _ = tok.train_bpe_ranks(tok._take_bytes(corpus.documents(), 20_000_000), 512)
    assert trained.encoding._mergeable_ranks == ranks  # the ranks file holds exactly what was trained

    def no_training(*a, **k):
        raise AssertionError("the cached BPE must be reused, not retrained")

    monkeypatch.setattr(tok, "train_bpe_ranks", no_training)
    again = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=512), corpus, cache)
    assert again.identity == trained.identity
    assert again.encode(UNICODE) == trained.encode(UNICODE)


def test_bpe_in_tiktoken_equals_hf_tokenizers_on_heldout_text(corpus):
    docs = list(corpus.documents())
    ranks, hf = tok.train_bpe_ranks(docs[:-3], 512)
    enc = tok._make_encoding("t", ranks)
    unicode_to_byte = {c: b for b, c in tok.bytes_to_unicode().items()}
    for held_out in docs[-3:] + [UNICODE]:
        ours = [enc.decode_single_token_bytes(i) for i in enc.encode_ordinary(held_out)]
        theirs = [bytes(unicode_to_byte[c] for c in hf.id_to_token(i)) for i in hf.encode(held_out).ids]
        assert ours == theirs


def test_identity_depends_on_ranks(corpus, tmp_path):
    a = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), corpus, tmp_path)
    b = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=320), corpus, tmp_path)
    assert a.identity != b.identity and a.identity == build_tokenizer(
        TokenizerConfig(kind="bpe", vocab_size=300), corpus, tmp_path).identity


def test_tiktoken_local_ranks_file(bpe, tmp_path):
    trained = bpe[0]
    path = tmp_path / "mine.tiktoken"
    tok.write_ranks(trained.encoding._mergeable_ranks, path)
    t = build_tokenizer(TokenizerConfig(kind="tiktoken", name=str(path)), None, tmp_path)
    assert t.encode(UNICODE) == trained.encode(UNICODE)
    assert t.identity.split("-")[-1] == trained.identity.split("-")[-1]  # same ranks, same digest


def test_tiktoken_offline_error_names_alternatives(monkeypatch):
    def offline(name):
        raise OSError("Failed to resolve 'openaipublic.blob.core.windows.net'")  # what requests raises offline

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(ValueError, match="offline") as e:
        build_tokenizer(TokenizerConfig(kind="tiktoken", name="cl100k_base"), None, Path("."))
    for alternative in ("kind=bpe", "kind=bytes", "kind=chars", ".tiktoken"):
        assert alternative in str(e.value)


def test_tiktoken_unknown_name():
    with pytest.raises(ValueError, match="not a tiktoken encoding"):
        tok.load_tiktoken("no_such_encoding")
    with pytest.raises(ValueError, match="no such ranks file"):
        tok.load_tiktoken("/nonexistent/x.tiktoken")


def test_config_and_corpus_errors():
    with pytest.raises(ValueError, match="tokenizer.kind='wordpiece'"):
        TokenizerConfig(kind="wordpiece")
    with pytest.raises(ValueError, match="tokenizer.vocab_size=100"):
        TokenizerConfig(kind="bpe", vocab_size=100)
    with pytest.raises(ValueError, match="none was given"):
        build_tokenizer(TokenizerConfig(kind="bpe"), None, Path("."))


def test_check_vocab():
    check_vocab(4096, 4096)
    with pytest.raises(ValueError, match=r"model.vocab_size=4000 .* >= 4096 \(e.g. 4096"):
        check_vocab(4096, 4000)

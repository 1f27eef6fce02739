"""Tokenizers behind one object: tiktoken named encodings, a byte-level BPE trained by the project, bytes, chars.

Every tokenizer is (or wraps) a `tiktoken.Encoding`, so encoding always runs at tiktoken's speed, and carries an
`identity` = name + sha256 of its ranks, special tokens and split pattern. The identity is stored with every token
cache and every run, so "which tokenizer produced these tokens" is never a guess.
No jax import here: the data path must stay fast to import.
"""
from __future__ import annotations

import base64
import collections
import functools
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tiktoken
import tiktoken.load
from filelock import FileLock

if TYPE_CHECKING:  # avoid an import cycle at run time
    from scaling.data.sources import Source

KINDS = ("bpe", "tiktoken", "bytes", "chars")
NAMED_ENCODINGS = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")
ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenization regex (tiktoken's r50k pattern). HF tokenizers' ByteLevel(use_regex=True) splits with the
# same expression, which is what lets a BPE trained by HF run inside tiktoken with identical output.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
N_THREADS = max(1, os.cpu_count() or 1)


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # "bpe" (trained by the project) | "tiktoken" (named encoding or .tiktoken file) | "bytes" | "chars"
    name: str = "gpt2"  # tiktoken encoding name (or a path to a local .tiktoken ranks file) when kind == "tiktoken"
    vocab_size: int = 4096  # target vocab for kind == "bpe"/"chars", including the end-of-text token
    train_bytes: int = 20_000_000  # how much of the corpus the BPE trainer reads (the tokenizer is cached by content hash)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"tokenizer.kind={self.kind!r} is not one of {KINDS}; pick one of them")
        if self.kind == "bpe" and not 257 < self.vocab_size <= 1_000_000:
            raise ValueError(
                f"tokenizer.vocab_size={self.vocab_size} is out of range for kind=bpe; use 258..1000000 "
                "(256 byte tokens + end-of-text + at least one merge), e.g. 2048..32768"
            )
        if self.kind == "chars" and self.vocab_size < 257:
            raise ValueError(f"tokenizer.vocab_size={self.vocab_size} < 257 for kind=chars; use >= 257 (256 bytes + eot)")
        if self.train_bytes <= 0:
            raise ValueError(f"tokenizer.train_bytes={self.train_bytes} must be > 0, e.g. 20_000_000")


class Tokenizer:
    """A thin wrapper over a tiktoken.Encoding: documents are encoded as ordinary text (no special tokens inside)."""

    def __init__(self, encoding: tiktoken.Encoding, name: str, kind: str) -> None:
        self.encoding = encoding
        self.name = name
        self.kind = kind
        self.eot: int = encoding.eot_token
        self.n_vocab: int = encoding.n_vocab
        self.identity: str = f"{name}-{ranks_digest(encoding)[:12]}"

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # tiktoken releases the GIL, so threads scale over cores
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=N_THREADS)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([int(i) for i in ids], errors="replace")

    @functools.cached_property
    def text_sizes(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(bytes_V, chars_V): the UTF-8 bytes and characters each token id spells; None without text (synthetic).

        Documents are encoded without special tokens, so a text's tokens concatenate to its UTF-8 bytes exactly:
        summing bytes_V over them counts the text's bytes. Characters are counted as the bytes that start one (all but
        the 10xxxxxx continuation bytes, RFC 3629 sec. 3), which sums correctly even over tokens that split a
        character. End-of-text and other special tokens spell no text: 0 and 0."""
        if self.encoding is None:
            return None
        bytes_V, chars_V = np.zeros(self.n_vocab, np.int64), np.zeros(self.n_vocab, np.int64)
        for token, rank in self.encoding._mergeable_ranks.items():
            bytes_V[rank] = len(token)
            chars_V[rank] = sum((b & 0xC0) != 0x80 for b in token)
        return bytes_V, chars_V

    def __repr__(self) -> str:
        return f"Tokenizer({self.identity}, n_vocab={self.n_vocab}, eot={self.eot})"


def ranks_digest(encoding: tiktoken.Encoding) -> str:
    """sha256 over the ranks (in tiktoken file format), special tokens and pattern: two encodings that tokenize
    differently never share a digest."""
    h = hashlib.sha256()
    for token, rank in sorted(encoding._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    h.update(json.dumps(encoding._special_tokens, sort_keys=True).encode())
    h.update(encoding._pat_str.encode())
    return h.hexdigest()


def _make_encoding(name: str, ranks: dict[bytes, int], pat_str: str = GPT2_PAT) -> tiktoken.Encoding:
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: len(ranks)})


def byte_ranks() -> dict[bytes, int]:
    return {bytes([b]): b for b in range(256)}


def bytes_tokenizer() -> Tokenizer:
    """Raw UTF-8 bytes: ids 0..255 are the byte values, 256 is end-of-text (n_vocab = 257)."""
    return Tokenizer(_make_encoding("bytes", byte_ranks()), "bytes", "bytes")


def chars_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Characters: every byte (so any text encodes) plus one token per multi-byte character of the corpus, most
    frequent first, until vocab_size (incl. eot) is reached. ASCII characters are their byte; each non-ASCII
    character kept is a single token. Its UTF-8 prefixes also get ids, because tiktoken builds a token by merging
    pairs; a prefix is never emitted for a kept character."""
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(c for c in text if ord(c) >= 128)
    ranks = byte_ranks()
    for char, _ in counts.most_common():
        utf8 = char.encode("utf-8")
        new = [utf8[:k] for k in range(2, len(utf8) + 1) if utf8[:k] not in ranks]
        if len(ranks) + len(new) + 1 > vocab_size:
            break
        for prefix in new:
            ranks[prefix] = len(ranks)
    return Tokenizer(_make_encoding(f"chars{len(ranks) + 1}", ranks), f"chars{len(ranks) + 1}", "chars")


def load_tiktoken(name: str) -> Tokenizer:
    """A named tiktoken encoding through tiktoken's normal (downloading, cached) path, or a local .tiktoken file."""
    path = Path(name).expanduser()
    if name.endswith(".tiktoken") or path.is_file():
        if not path.is_file():
            raise ValueError(f"tokenizer.name={name!r}: no such ranks file; give an existing .tiktoken file")
        ranks = tiktoken.load.load_tiktoken_bpe(str(path))
        if not ranks:
            raise ValueError(f"tokenizer.name={name!r}: the ranks file is empty; give a non-empty .tiktoken file")
        return Tokenizer(_make_encoding(path.stem, ranks), path.stem, "tiktoken")
    try:
        encoding = tiktoken.get_encoding(name)
    except ValueError as e:  # tiktoken's "Unknown encoding"
        raise ValueError(
            f"tokenizer.name={name!r} is not a tiktoken encoding ({e}); use one of {NAMED_ENCODINGS} "
            "or a path to a local .tiktoken ranks file"
        ) from e
    except Exception as e:  # requests.ConnectionError, timeouts, hash mismatch on a truncated download ...
        raise ValueError(
            f"tokenizer.kind=tiktoken name={name!r}: could not load the encoding ({type(e).__name__}: {str(e)[:200]}). "
            "tiktoken downloads its ranks on first use, and this machine seems to be offline. Offline alternatives: "
            "tokenizer.kind=bpe (a BPE trained on your corpus and cached), tokenizer.kind=bytes, tokenizer.kind=chars, "
            "or tokenizer.name=/path/to/file.tiktoken (a local ranks file; TIKTOKEN_CACHE_DIR also works)."
        ) from e
    return Tokenizer(encoding, name, "tiktoken")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (openai/gpt-2 src/encoder.py, bytes_to_unicode): the alphabet
    of byte-level BPE vocabulary strings (HF tokenizers' ByteLevel, GPT-2's vocab.json)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train_bpe_ranks(texts: Iterable[str], vocab_size: int) -> tuple[dict[bytes, int], "object"]:
    """Train a byte-level BPE with HF `tokenizers` (Rust, multi-threaded) and convert it to tiktoken ranks.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; ranking every merged token by its
    merge order (Sennrich et al. 2016, Alg. 1) reproduces HF's merge sequence. Returns (ranks, the HF tokenizer)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the last id is end-of-text, added on the tiktoken side
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    unicode_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    merges = json.loads(hf.to_str())["model"]["merges"]
    ranks = byte_ranks()
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(unicode_to_byte[c] for c in left + right)
        if token not in ranks:  # two merges can spell the same bytes; tiktoken keeps the first (lowest) rank
            ranks[token] = len(ranks)
    return ranks, hf


def _take_bytes(texts: Iterable[str], budget: int) -> Iterator[str]:
    n = 0
    for text in texts:
        if n >= budget:
            return
        n += len(text.encode("utf-8"))
        yield text


def write_ranks(ranks: dict[bytes, int], path: Path) -> None:
    # tiktoken's file format ("base64(token) rank" per line); tiktoken.load.dump_tiktoken_bpe needs blobfile
    lines = (base64.b64encode(token) + b" " + str(rank).encode() for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    Path(path).write_bytes(b"\n".join(lines) + b"\n")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def bpe_tokenizer(cfg: TokenizerConfig, corpus: "Source", cache_dir: Path) -> Tokenizer:
    """Train (once, under a file lock) or reuse the BPE for (corpus content, vocab_size, train_bytes)."""
    key = hashlib.sha256(f"{corpus.identity}|{cfg.vocab_size}|{cfg.train_bytes}".encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() / "tokenizers"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"bpe{cfg.vocab_size}-{key}.tiktoken"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            t0 = time.perf_counter()
            n_bytes = 0

            def counted(texts: Iterable[str]) -> Iterator[str]:
                nonlocal n_bytes
                for text in texts:
                    n_bytes += len(text.encode("utf-8"))
                    yield text

            ranks, _ = train_bpe_ranks(counted(_take_bytes(corpus.documents(), cfg.train_bytes)), cfg.vocab_size)
            if n_bytes == 0:
                raise ValueError(f"BPE training corpus {corpus.description} has no text; give a non-empty source")
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            write_ranks(ranks, tmp)
            info = {"corpus": corpus.identity, "corpus_description": corpus.description, "vocab_size": cfg.vocab_size,
                    "train_bytes_read": n_bytes, "seconds": round(time.perf_counter() - t0, 2)}
            _atomic_write_text(path.with_suffix(".json"), json.dumps(info, indent=1))
            os.replace(tmp, path)  # the ranks file appears complete or not at all
    ranks = tiktoken.load.load_tiktoken_bpe(str(path))
    name = f"bpe{len(ranks) + 1}"
    return Tokenizer(_make_encoding(name, ranks), name, "bpe")


def build_tokenizer(cfg: TokenizerConfig, corpus: "Source | None", cache_dir: Path) -> Tokenizer:
    cfg.validate()
    if cfg.kind == "bytes":
        return bytes_tokenizer()
    if cfg.kind == "tiktoken":
        return load_tiktoken(cfg.name)
    if corpus is None:
        raise ValueError(f"tokenizer.kind={cfg.kind} learns its vocabulary from a corpus, but none was given; "
                         "pass a Source (or use kind=bytes / kind=tiktoken)")
    if cfg.kind == "chars":
        return chars_tokenizer(_take_bytes(corpus.documents(), cfg.train_bytes), cfg.vocab_size)
    return bpe_tokenizer(cfg, corpus, cache_dir)


def check_vocab(tokenizer_n_vocab: int, model_vocab_size: int) -> None:
    """The model's embedding must have a row for every token id the tokenizer can emit."""
    if model_vocab_size < tokenizer_n_vocab:
        padded = -(-tokenizer_n_vocab // 64) * 64
        raise ValueError(
            f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer_n_vocab} ids "
            f"incl. end-of-text); set model.vocab_size >= {tokenizer_n_vocab} (e.g. {padded}, a multiple of 64)"
        )

"""Data config -> tokenized cache -> TokenData: memory-mapped train/val tokens and a stateless sampler.

The training batch of step s is a pure function of (seed, s): resuming needs no iterator state and two runs with
the same seed see identical tokens, so a run's D is exactly steps x batch x seq_len tokens of a known stream.
Letters in names: B batch, L sequence length.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scaling.data import cache
from scaling.data.sources import Source, embedded_source, hf_source, local_source
from scaling.data.synthetic import MarkovChain, SyntheticConfig, SyntheticTokenizer
from scaling.data.tokenizers import Tokenizer, TokenizerConfig, build_tokenizer, check_vocab
from scaling.paths import DEFAULT_CACHE_ROOT, cache_root

SOURCES = ("embedded", "local", "hf", "synthetic")
DEFAULT_CACHE_DIR = DEFAULT_CACHE_ROOT


@dataclass
class DataConfig:
    source: str = "embedded"  # "embedded" | "local" | "hf" | "synthetic"
    path: str | None = None  # local: file or glob (.txt/.jsonl/.parquet, .xz/.gz allowed); hf: data_files
    text_field: str = "text"  # jsonl/parquet/hf column
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    hf_streaming: bool = False
    max_bytes: int | None = None  # read at most this much text (for quick runs)
    val_fraction: float = 0.005  # held out BY DOCUMENT
    doc_bytes: int = 65_536  # .txt: blank-line paragraphs are packed into documents of about this size
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cache_dir: str = DEFAULT_CACHE_DIR  # env SCALING_CACHE overrides the default
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} is not one of {SOURCES}; pick one of them")
        if self.source == "local" and not self.path:
            raise ValueError("data.path is required for data.source=local; give a file or glob (.txt/.jsonl/.parquet)")
        if self.source == "hf" and not self.hf_name:
            raise ValueError("data.hf_name is required for data.source=hf, e.g. 'roneneldan/TinyStories' or 'json'")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"data.max_bytes={self.max_bytes} must be > 0 or None (read everything)")
        if not 0.0 < self.val_fraction <= 0.5:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 0.5], e.g. 0.005")
        if self.doc_bytes < 0:
            raise ValueError(f"data.doc_bytes={self.doc_bytes} must be >= 0 (0: one paragraph per document)")
        self.tokenizer.validate()
        self.synthetic.validate()

    def resolved_cache_dir(self) -> Path:
        """The token cache folder (created on first use); one error naming the setting when it cannot be one."""
        if self.cache_dir == DEFAULT_CACHE_DIR and os.environ.get("SCALING_CACHE"):
            path, name = cache_root(), "SCALING_CACHE"
        else:
            path, name = Path(self.cache_dir).expanduser(), "data.cache_dir"
        # The nearest existing ancestor must be a folder: the cache's subfolders are created below it.
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ValueError(f"{name}={str(path)!r}: {str(existing)!r} is a file, not a folder; point {name} at a "
                             f"folder (created if missing), e.g. {DEFAULT_CACHE_DIR}")
        return path


class TokenData:
    def __init__(self, folder: Path, tokenizer: Tokenizer, entropy_rate: float | None = None) -> None:
        meta = cache.read_meta(folder)
        if meta["tokenizer"] != tokenizer.identity:
            raise ValueError(
                f"{folder}: the token cache was built with tokenizer {meta['tokenizer']}, not {tokenizer.identity}; "
                "use the tokenizer it was built with, or rebuild the cache for this one (load_tokens does)"
            )
        cache.check_tokens(folder, meta, tokenizer.n_vocab)
        self.folder = folder
        self.meta = meta
        self.tokenizer = tokenizer
        self.vocab_size: int = tokenizer.n_vocab
        self.train: np.ndarray = cache.open_tokens(folder, "train", meta)
        self.val: np.ndarray = cache.open_tokens(folder, "val", meta)
        self.entropy_rate = entropy_rate
        self._warned_repeat = False

    def __repr__(self) -> str:
        return (f"TokenData({self.meta['source_description']}, {self.tokenizer.identity}, train={len(self.train):,} "
                f"val={len(self.val):,} tokens, {self.folder})")

    def check_model_vocab(self, model_vocab_size: int) -> None:
        check_vocab(self.vocab_size, model_vocab_size)

    def validate_batch_shape(self, batch_size: int, seq_len: int) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must both be > 0")
        need = batch_size * (seq_len + 1)
        if len(self.train) < need:
            raise ValueError(
                f"the training split has {len(self.train):,} tokens, fewer than one batch "
                f"(batch_size={batch_size} x (seq_len={seq_len} + 1) = {need:,}); use more data "
                "(data.max_bytes, a larger source) or a smaller batch_size/seq_len"
            )

    def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        """int32 [B, L+1]: B windows at uniform random offsets. A counter-based draw keyed by (seed, step)
        (numpy SeedSequence), so the batch is a pure function of its arguments."""
        self.validate_batch_shape(batch_size, seq_len)
        rng = np.random.default_rng([seed, step])
        starts_B = rng.integers(0, len(self.train) - seq_len, size=batch_size)
        idx_BxL1 = starts_B[:, None] + np.arange(seq_len + 1)[None, :]
        return np.asarray(self.train[idx_BxL1], dtype=np.int32)

    def val_batches(self, n_tokens: int, batch_size: int, seq_len: int) -> Iterator[np.ndarray]:
        """Fixed, deterministic int32 [B, L+1] batches of non-overlapping windows from the start of the validation
        split, covering about n_tokens targets (capped by the split; wraps around to fill one batch if tiny)."""
        if len(self.val) < seq_len + 1:
            raise ValueError(f"the validation split has {len(self.val):,} tokens, fewer than seq_len + 1 = "
                             f"{seq_len + 1}; raise data.val_fraction or use more data")
        n_windows_avail = (len(self.val) - 1) // seq_len
        n_batches = max(1, min(-(-n_tokens // (batch_size * seq_len)), n_windows_avail // batch_size))
        for b in range(n_batches):
            windows_B = (b * batch_size + np.arange(batch_size)) % n_windows_avail
            idx_BxL1 = windows_B[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
            yield np.asarray(self.val[idx_BxL1], dtype=np.int32)

    def val_text_per_token(self, n_tokens: int, batch_size: int, seq_len: int) -> tuple[float, float] | None:
        """(UTF-8 bytes, characters) per target token of exactly the batches `val_batches` yields: the text whose mean
        loss is the validation loss, so loss / ln 2 / bytes is its bits per byte (scaling.record.text_metrics). The
        end-of-text targets count as tokens of no text. None when the tokens have no text (synthetic data)."""
        sizes = self.tokenizer.text_sizes
        if sizes is None:
            return None
        bytes_V, chars_V = sizes
        n_bytes = n_chars = n_targets = 0
        for batch_BxLp1 in self.val_batches(n_tokens, batch_size, seq_len):
            targets_BxL = batch_BxLp1[:, 1:]
            n_bytes += int(bytes_V[targets_BxL].sum())
            n_chars += int(chars_V[targets_BxL].sum())
            n_targets += targets_BxL.size
        return n_bytes / n_targets, n_chars / n_targets

    def tokenizer_record(self) -> dict:
        """The run record's `tokenizer` field: which tokenizer made these tokens."""
        tok = self.tokenizer
        return {"name": tok.name, "identity": tok.identity, "vocab_size": tok.n_vocab}

    def data_record(self) -> dict:
        """The run record's `data` field: the cache's plain metadata and the split sizes."""
        meta = {k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool, type(None)))}
        return {**meta, "train_tokens": int(len(self.train)), "val_tokens": int(len(self.val))}

    def epochs(self, tokens_seen: int) -> float:
        """tokens_seen / unique training tokens. Beyond 1, data repeats, which changes the scaling law
        (Muennighoff et al. 2023, 'Scaling Data-Constrained Language Models'); warned about once."""
        epochs = tokens_seen / max(len(self.train), 1)
        if epochs > 1.0 and not self._warned_repeat:
            self._warned_repeat = True
            warnings.warn(f"{tokens_seen:,} tokens seen > {len(self.train):,} unique training tokens "
                          f"({epochs:.2f} epochs): data is repeated (Muennighoff et al. 2023)", stacklevel=2)
        return epochs

    def unigram_entropy(self) -> float:
        """Entropy of the training tokens' unigram distribution, nats/token: the loss of a model that ignores context."""
        counts = np.bincount(np.asarray(self.train), minlength=self.vocab_size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def make_source(cfg: DataConfig) -> Source:
    if cfg.source == "embedded":
        return embedded_source(cfg.max_bytes, cfg.doc_bytes)
    if cfg.source == "local":
        return local_source(cfg.path or "", cfg.text_field, cfg.max_bytes, cfg.doc_bytes)
    if cfg.source == "hf":
        return hf_source(cfg.hf_name or "", cfg.hf_config, cfg.hf_split, cfg.text_field, cfg.hf_streaming, cfg.path,
                         cfg.max_bytes, cfg.resolved_cache_dir())
    raise ValueError(f"data.source={cfg.source!r} has no text source")


def _load_synthetic(cfg: DataConfig, cache_dir: Path) -> TokenData:
    chain = MarkovChain(cfg.synthetic)
    tokenizer = SyntheticTokenizer(chain)
    n_val = max(8192, round(cfg.synthetic.n_tokens * cfg.val_fraction))
    key = cache.cache_key({"v": cache.FORMAT_VERSION, "synthetic": vars(cfg.synthetic), "n_val": n_val})
    folder = cache_dir / "tokens" / f"{tokenizer.identity}-{key}"

    def build(tmp: Path) -> dict:
        t0 = time.perf_counter()
        # two independent stationary chains: the validation stream is never part of the training stream
        train = chain.sample(cfg.synthetic.n_tokens, [cfg.synthetic.seed, 1])
        val = chain.sample(n_val, [cfg.synthetic.seed, 2])
        dtype = cache.token_dtype(tokenizer.n_vocab)
        train.astype(dtype).tofile(tmp / "train.bin")
        val.astype(dtype).tofile(tmp / "val.bin")
        seconds = time.perf_counter() - t0
        return {"format": cache.FORMAT_VERSION, "source": f"synthetic:{vars(cfg.synthetic)}",
                "source_description": f"synthetic order-{chain.k} Markov chain over {chain.V} symbols",
                "tokenizer": tokenizer.identity, "n_vocab": tokenizer.n_vocab, "eot": tokenizer.eot,
                "dtype": dtype.name, "train_tokens": len(train), "val_tokens": len(val), "train_docs": 1,
                "val_docs": 1, "documents": 2, "bytes": 0, "entropy_rate": chain.entropy_rate,
                "split": {"rule": "independent validation chain", "val_fraction": cfg.val_fraction},
                "tokenize_seconds": round(seconds, 3), "tokens_per_second": round((len(train) + len(val)) / seconds)}

    return TokenData(cache.build_once(folder, build), tokenizer, entropy_rate=chain.entropy_rate)


def load_tokens(cfg: DataConfig) -> TokenData:
    """Tokenize cfg's source into the cache, or reuse it; safe when several jobs start at once."""
    cfg.validate()
    cache_dir = cfg.resolved_cache_dir()
    if cfg.source == "synthetic":
        return _load_synthetic(cfg, cache_dir)
    source = make_source(cfg)
    # the tokenizer learns from training documents only: validation text stays unseen by every trained part
    tokenizer = build_tokenizer(cfg.tokenizer, source.train_view(cfg.val_fraction), cache_dir)
    key = cache.cache_key({"v": cache.FORMAT_VERSION, "source": source.identity, "tokenizer": tokenizer.identity,
                           "val_fraction": cfg.val_fraction})
    folder = cache_dir / "tokens" / f"{cfg.source}-{tokenizer.identity}-{key}"
    built = cache.build_once(folder, lambda tmp: cache.tokenize_source(source, tokenizer, cfg.val_fraction, tmp))
    return TokenData(built, tokenizer)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scaling.data", description="Tokenize a source into the token cache.")
    p.add_argument("--source", default="embedded", choices=SOURCES)
    p.add_argument("--path", default=None, help="local file or glob; for --source hf, its data_files")
    p.add_argument("--tokenizer", default="bpe", choices=("bpe", "tiktoken", "bytes", "chars"))
    p.add_argument("--vocab-size", type=int, default=TokenizerConfig.vocab_size)
    p.add_argument("--name", default=TokenizerConfig.name, help="tiktoken encoding name or .tiktoken file")
    p.add_argument("--train-bytes", type=int, default=TokenizerConfig.train_bytes)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--max-bytes", type=int, default=None)
    p.add_argument("--text-field", default="text")
    p.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction)
    p.add_argument("--hf-name", default=None)
    p.add_argument("--hf-config", default=None)
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-streaming", action="store_true")
    p.add_argument("--synthetic-vocab", type=int, default=SyntheticConfig.vocab_size)
    p.add_argument("--synthetic-order", type=int, default=SyntheticConfig.order)
    p.add_argument("--synthetic-tokens", type=int, default=SyntheticConfig.n_tokens)
    a = p.parse_args(argv)
    try:
        cfg = DataConfig(source=a.source, path=a.path, text_field=a.text_field, hf_name=a.hf_name,
                         hf_config=a.hf_config, hf_split=a.hf_split, hf_streaming=a.hf_streaming,
                         max_bytes=a.max_bytes, val_fraction=a.val_fraction, cache_dir=a.cache_dir,
                         tokenizer=TokenizerConfig(kind=a.tokenizer, name=a.name, vocab_size=a.vocab_size,
                                                   train_bytes=a.train_bytes),
                         synthetic=SyntheticConfig(vocab_size=a.synthetic_vocab, order=a.synthetic_order,
                                                   n_tokens=a.synthetic_tokens))
        t0 = time.perf_counter()
        data = load_tokens(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None  # a bad input, as every other command of the package exits (argparse's code)
    m = data.meta
    fresh = m["builder_pid"] == os.getpid()
    print(f"source      {m['source_description']} ({m['bytes']:,} bytes)")
    print(f"tokenizer   {data.tokenizer.identity} (n_vocab {data.vocab_size}, eot {data.tokenizer.eot})")
    print(f"tokens      {len(data.train):,} train + {len(data.val):,} val ({m['dtype']})")
    print(f"documents   {m['train_docs']:,} train + {m['val_docs']:,} val")
    print(f"tokens/s    {m['tokens_per_second']:,} ({'tokenized now' if fresh else 'reused cache, built ' + m['created']})"
          f"; total {time.perf_counter() - t0:.1f} s")
    if m["bytes"]:
        print(f"bytes/token {m['bytes'] / (len(data.train) + len(data.val)):.3f}")
    print(f"unigram H   {data.unigram_entropy():.4f} nats/token (train)")
    if data.entropy_rate is not None:
        print(f"entropy rate {data.entropy_rate:.4f} nats/token (exact)")
    print(f"cache       {data.folder}")

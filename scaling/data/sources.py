"""Text sources: local files (.txt/.xz/.gz, .jsonl, .parquet, globs), Hugging Face `datasets`, the embedded corpus.

A Source is an ordered stream of documents plus a content identity (sha256 of the files it reads, or the HF
fingerprint), so the token cache is keyed by what was read, not by where it lives.
Split rule (held out BY DOCUMENT): document i is validation iff i % k == k - 1 with k = round(1 / val_fraction).
A stride needs no document count up front (streaming sources) and gives exactly the asked-for fraction.
"""
from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import json
import lzma
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_CORPUS = Path(__file__).parent / "corpus" / "english-prose-24M.txt.xz"
TEXT_SUFFIXES = (".txt", ".txt.xz", ".txt.gz", ".xz", ".gz")
DOC_BYTES = 65_536  # the shared corpora were cut into ~64 KiB pieces at paragraph boundaries (corpus/README.md)


@dataclass
class Source:
    identity: str  # content hash: equal identity => equal documents
    description: str  # for humans and error messages
    _documents: Callable[[], Iterator[str]]

    def documents(self) -> Iterator[str]:
        return self._documents()

    def train_view(self, val_fraction: float) -> "Source":
        """Only the training documents (what a BPE trainer may read without seeing validation text)."""
        docs = lambda: (d for i, d in enumerate(self.documents()) if not is_val_doc(i, val_fraction))  # noqa: E731
        return Source(f"{self.identity}|train@{val_fraction}", f"{self.description} (train split)", docs)


def val_stride(val_fraction: float) -> int:
    return max(2, round(1.0 / val_fraction))


def is_val_doc(index: int, val_fraction: float) -> bool:
    k = val_stride(val_fraction)
    return index % k == k - 1


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_bytes(path: Path) -> bytes:
    name = path.name.lower()
    opener = lzma.open if name.endswith(".xz") else gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: corrupt compressed file ({e}); re-create or re-download it") from e


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{path}: not valid UTF-8 at byte {e.start} (line {line}): {raw[e.start:e.start + 8]!r}; "
            "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from e


def pack_paragraphs(text: str, doc_bytes: int) -> Iterator[str]:
    """Blank-line-separated paragraphs, packed in order into documents of about doc_bytes (0: one per paragraph)."""
    parts: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        parts.append(para)
        size += len(para) + 2
        if size >= doc_bytes:
            yield "\n\n".join(parts)
            parts, size = [], 0
    if parts:
        yield "\n\n".join(parts)


def _txt_docs(path: Path, doc_bytes: int) -> Iterator[str]:
    yield from pack_paragraphs(_decode(path, _read_bytes(path)), doc_bytes)


def _jsonl_docs(path: Path, text_field: str) -> Iterator[str]:
    for n, line in enumerate(_decode(path, _read_bytes(path)).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e}); each line must be one JSON object") from e
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{n}: no text field {text_field!r} (found {keys}); set data.text_field")
        if record[text_field]:
            yield str(record[text_field])


def _parquet_docs(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid for truncated/corrupt files
        raise ValueError(f"{path}: not a readable parquet file ({e}); re-create it") from e
    names = table.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {names}); set data.text_field")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t)


def expand_paths(pattern: str) -> list[Path]:
    expanded = str(Path(pattern).expanduser())
    if any(c in expanded for c in "*?["):
        paths = sorted(Path(p) for p in globlib.glob(expanded, recursive=True) if Path(p).is_file())
        if not paths:
            raise ValueError(f"data.path={pattern!r}: the glob matches no file; check the pattern")
        return paths
    path = Path(expanded)
    if not path.is_file():
        raise ValueError(f"data.path={pattern!r}: no such file; give an existing .txt/.jsonl/.parquet file or a glob")
    return [path]


def _file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.xz", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "txt"
    raise ValueError(f"{path}: unknown file type; use .txt (.xz/.gz), .jsonl or .parquet")


def _capped(docs: Iterator[str], max_bytes: int | None) -> Iterator[str]:
    """Stop after max_bytes of UTF-8 text, cutting the last document at a character boundary."""
    if max_bytes is None:
        yield from docs
        return
    left = max_bytes
    for doc in docs:
        raw = doc.encode("utf-8")
        if len(raw) >= left:
            cut = raw[:left].decode("utf-8", errors="ignore")
            if cut:
                yield cut
            return
        left -= len(raw)
        yield doc


def local_source(pattern: str, text_field: str = "text", max_bytes: int | None = None,
                 doc_bytes: int = DOC_BYTES) -> Source:
    paths = expand_paths(pattern)
    kinds = [_file_kind(p) for p in paths]
    for p in paths:
        if p.stat().st_size == 0:
            raise ValueError(f"{p}: the file is empty; give a file with text")
    # the content hash keys the cache: the same bytes anywhere on disk reuse one tokenization
    digest = hashlib.sha256("|".join(_sha256_file(p) for p in paths).encode()).hexdigest()
    field = text_field if set(kinds) - {"txt"} else ""
    identity = f"local:{digest[:16]}:field={field}:doc={doc_bytes}:max={max_bytes}"
    description = str(paths[0]) if len(paths) == 1 else f"{pattern} ({len(paths)} files)"

    def documents() -> Iterator[str]:
        def all_docs() -> Iterator[str]:
            for path, kind in zip(paths, kinds):
                if kind == "txt":
                    yield from _txt_docs(path, doc_bytes)
                elif kind == "jsonl":
                    yield from _jsonl_docs(path, text_field)
                else:
                    yield from _parquet_docs(path, text_field)
        yield from _capped(all_docs(), max_bytes)

    return Source(identity, description, documents)


def embedded_source(max_bytes: int | None = None, doc_bytes: int = DOC_BYTES) -> Source:
    """The offline default: 24 MB of public-domain English prose shipped in scaling/data/corpus/ (see its README)."""
    if not EMBEDDED_CORPUS.is_file():
        raise ValueError(f"the embedded corpus {EMBEDDED_CORPUS} is missing from this install; reinstall the "
                         "package or use data.source=local with data.path=...")
    src = local_source(str(EMBEDDED_CORPUS), max_bytes=max_bytes, doc_bytes=doc_bytes)
    return Source(src.identity.replace("local:", "embedded:", 1), f"embedded corpus {EMBEDDED_CORPUS.name}",
                  src._documents)


def hf_source(name: str, config: str | None, split: str, text_field: str, streaming: bool,
              data_files: str | None, max_bytes: int | None, cache_dir: Path) -> Source:
    """A Hugging Face dataset via `datasets.load_dataset` (hub name, or a builder such as "json"/"parquet"/"text"
    with data_files=data.path)."""
    import datasets  # slow to import: only when used

    kwargs = {"data_files": str(Path(data_files).expanduser())} if data_files else {}
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming,
                                   cache_dir=str(Path(cache_dir) / "hf"), **kwargs)
    except Exception as e:
        raise ValueError(f"data.hf_name={name!r} config={config!r} split={split!r}: could not load "
                         f"({type(e).__name__}: {str(e)[:300]}); check the name, config, split and network") from e
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(f"HF dataset {name!r}: no column {text_field!r} (columns: {columns}); set data.text_field")
    # non-streaming datasets carry a fingerprint; a hub stream is identified by what was asked for; local
    # data_files are also hashed by content, since datasets' fingerprint of a local file follows its path and mtime
    fingerprint = getattr(ds, "_fingerprint", None) or f"{name}/{config}/{split}"
    if data_files:
        files = "|".join(_sha256_file(p) for p in expand_paths(data_files))
        fingerprint += ":" + hashlib.sha256(files.encode()).hexdigest()[:16]
    identity = f"hf:{fingerprint}:field={text_field}:max={max_bytes}"

    def documents() -> Iterator[str]:
        def texts() -> Iterator[str]:
            for n, row in enumerate(ds):
                if text_field not in row:
                    raise ValueError(f"HF dataset {name!r} row {n}: no column {text_field!r} (found {sorted(row)}); "
                                     "set data.text_field")
                if row[text_field]:
                    yield str(row[text_field])
        yield from _capped(texts(), max_bytes)

    return Source(identity, f"hf:{name}/{config or ''}:{split}", documents)

"""The tokenized cache: one folder per (source content, tokenizer identity, split) holding train.bin, val.bin
(raw uint16/uint32 tokens, memory-mapped by readers) and meta.json.

Concurrency: the first of several sweep jobs takes a file lock and builds into a temporary folder; the others
block on the lock and then reuse. The folder is renamed into place only when complete (meta.json written last), so
a half-written cache is never visible and a crashed build leaves nothing behind but a stale temp folder that the
next builder deletes.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from filelock import FileLock

from scaling.data.sources import Source, is_val_doc
from scaling.data.tokenizers import Tokenizer

FORMAT_VERSION = 1
CHUNK_BYTES = 8 << 20  # text per tokenizer call: enough to keep every thread busy, small enough to stream


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if n_vocab <= 1 << 16 else np.dtype(np.uint32)


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def build_once(folder: Path, build: Callable[[Path], dict]) -> Path:
    """Return folder, building it with build(tmp_folder) -> meta under a lock if it does not exist yet."""
    if (folder / "meta.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "meta.json").is_file():  # another job built it while we waited
            return folder
        for stale in folder.parent.glob(folder.name + ".tmp-*"):  # left by a killed builder; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            meta = build(tmp)
            meta["integrity"] = {split: fingerprint(tmp / f"{split}.bin", meta["dtype"]) for split in ("train", "val")}
            meta["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            meta["builder_pid"] = os.getpid()
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if folder.exists():  # an incomplete folder without meta.json (e.g. copied by hand): replace it
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def _chunks(docs: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def tokenize_source(source: Source, tokenizer: Tokenizer, val_fraction: float, out: Path) -> dict:
    """Tokenize every document (eot appended to each) into out/train.bin and out/val.bin; returns the meta."""
    dtype = token_dtype(tokenizer.n_vocab)
    counts = {"train": [0, 0], "val": [0, 0]}  # split -> [documents, tokens]
    val_docs: list[int] = []
    n_bytes = 0
    val_text = [0, 0]  # UTF-8 bytes and characters of the validation documents (bits per byte, scaling.record)
    pending: tuple[np.ndarray, str] | None = None  # the last train document, held back in case val stays empty
    t0 = time.perf_counter()
    with open(out / "train.bin", "wb") as f_train, open(out / "val.bin", "wb") as f_val:
        def write(split: str, ids: np.ndarray, doc: str) -> None:
            (f_train if split == "train" else f_val).write(ids.tobytes())
            counts[split][0] += 1
            counts[split][1] += len(ids)
            if split == "val":
                val_text[0] += len(doc.encode("utf-8"))
                val_text[1] += len(doc)

        index = 0
        for chunk in _chunks(source.documents()):
            n_bytes += sum(len(d.encode("utf-8")) for d in chunk)
            for doc, ids in zip(chunk, tokenizer.encode_batch(chunk)):
                arr = np.asarray(ids + [tokenizer.eot], dtype=dtype)
                if is_val_doc(index, val_fraction):
                    write("val", arr, doc)
                    val_docs.append(index)
                else:
                    if pending is not None:
                        write("train", *pending)
                    pending = arr, doc
                index += 1
        if index == 0:
            raise ValueError(f"{source.description}: no documents (the text is empty or only whitespace); "
                             "give a source with text")
        if index < 2:
            # A .txt source packs its blank-line paragraphs into documents of about data.doc_bytes bytes, so a
            # blank line alone makes a second document only when the text exceeds that size.
            raise ValueError(f"{source.description}: only 1 document, but the validation split is held out by "
                             "document; give at least 2: add files (or records, for .jsonl/.parquet), or for text "
                             "set data.doc_bytes=0 (one document per blank-line-separated paragraph) or below the "
                             f"text's size ({n_bytes:,} bytes)")
        if counts["val"][0] == 0:  # fewer documents than the stride: the last one becomes validation
            write("val", *pending)
            val_docs.append(index - 1)
        else:
            write("train", *pending)
    seconds = time.perf_counter() - t0
    n_tokens = counts["train"][1] + counts["val"][1]
    return {
        "format": FORMAT_VERSION, "source": source.identity, "source_description": source.description,
        "tokenizer": tokenizer.identity, "n_vocab": tokenizer.n_vocab, "eot": tokenizer.eot, "dtype": dtype.name,
        "train_tokens": counts["train"][1], "val_tokens": counts["val"][1],
        "train_docs": counts["train"][0], "val_docs": counts["val"][0], "documents": index, "bytes": n_bytes,
        "val_bytes": val_text[0], "val_chars": val_text[1],
        "split": {"rule": "document i is validation iff i % k == k - 1", "val_fraction": val_fraction,
                  "val_doc_indices": val_docs},
        "tokenize_seconds": round(seconds, 3), "tokens_per_second": round(n_tokens / max(seconds, 1e-9)),
    }


def read_meta(folder: Path) -> dict:
    """meta.json of a cache folder, checked against the sizes of its token files."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"{folder}: not a token cache (no meta.json); rebuild it with load_tokens / python -m scaling.data")
    try:
        meta = json.loads(meta_path.read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            size = (folder / f"{split}.bin").stat().st_size
            if size != meta[f"{split}_tokens"] * itemsize:
                raise ValueError(f"{split}.bin has {size} bytes, meta says {meta[f'{split}_tokens']} tokens")
    except (OSError, KeyError, TypeError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{folder}: corrupt token cache ({e}); delete the folder to rebuild it") from e
    return meta


def fingerprint(path: Path, dtype: str) -> dict:
    """The largest token id and a checksum of a token file: together they prove every id fits the vocabulary without
    a pass over the tokens at each run start (a same-size corruption changes the checksum)."""
    tokens = np.fromfile(path, dtype=dtype)
    return {"max_id": int(tokens.max()) if tokens.size else -1,
            "blake2b": hashlib.blake2b(tokens.tobytes(), digest_size=16).hexdigest()}


def check_tokens(folder: Path, meta: dict, n_vocab: int) -> None:
    """Refuse a cache whose meta.json disagrees with the tokenizer or whose token files were changed after the build:
    out-of-range ids would train to NaN and be recorded as a diverged run."""
    fix = "delete the folder to rebuild it (load_tokens / python -m scaling.data does)"
    if meta.get("n_vocab") != n_vocab:
        raise ValueError(f"{folder}/meta.json: n_vocab is {meta.get('n_vocab')!r}, but its tokenizer has {n_vocab}; "
                         f"the file was edited or belongs to another cache: {fix}")
    for split in ("train", "val"):
        expected = (meta.get("integrity") or {}).get(split)
        actual = fingerprint(folder / f"{split}.bin", meta["dtype"])
        if expected is not None and expected != actual:
            raise ValueError(f"{folder}/{split}.bin changed after the cache was built (its checksum or largest token "
                             f"id {actual['max_id']} differs from meta.json's {expected.get('max_id')}): {fix}")
        if actual["max_id"] >= n_vocab:  # caches built before the integrity field: the ids are still checked
            raise ValueError(f"{folder}/{split}.bin holds token id {actual['max_id']}, outside the vocabulary of "
                             f"{n_vocab}: {fix}")


def open_tokens(folder: Path, split: str, meta: dict) -> np.ndarray:
    n = meta[f"{split}_tokens"]
    if n == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(n,))

"""Data sources as one 1-D array of token ids, which `data.TokenLoader` windows.

A source (`--data`) is text (`stdlib`, a text file, or a folder of them: `data.load_corpus`'s rules,
binary files skipped, at most 64 MiB), records (`.jsonl` / `.json` lines or `.parquet`, read with
Hugging Face `datasets`, the text in `--text-field`; a folder of only such files is their records
in sorted order), or token ids (`.npy` of any integer dtype, or `.bin`: raw uint16 as nanoGPT writes
them, or the dtype a sidecar `NAME.json` names, e.g. {"dtype": "uint32"}), memory-mapped as they are.

A text file is a document, a record is a document; the documents' ids are concatenated in order
with nothing between them. Byte-level text stays in memory as before (the batches of a default run
are unchanged); any other tokenized source is tokenized once into the cache as `KEY.bin` (uint16
when the vocabulary fits, else uint32) with a `KEY.json` sidecar, and every worker memory-maps it.
The key covers the source's files (paths, sizes, mtimes), the text field and the tokenizer's
content. Writers take a file lock and rename finished files into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from paratrain import data
from paratrain.vocab import (HFTokenizer, Tokenizer, load_tokenizer, parse_spec, tokenizer_identity,
                             tokenizer_vocab_size, train_bpe)

RECORD_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ARRAY_SUFFIXES = (".bin", ".npy")
BATCH_BYTES = 1 << 20  # text per tokenizer call
PIECE_CHARS = 1 << 20  # a longer document is encoded in pieces (byte-level tokenizers: same ids)
RECORD_BATCH = 1024
# a cut before a newline that follows a printable ASCII character: GPT-2's pre-tokenizer regex
# ends a piece there in any case (no piece holds both), so encoding the two sides apart changes no id
_CUT = re.compile(r"(?<=[!-~])(?=\n)")


@dataclass(frozen=True)
class Source:
    kind: str  # "text", "json", "parquet" or "array"
    path: str  # as given ("stdlib" included)
    files: tuple[str, ...]


def open_source(path: str) -> Source:
    """What `--data PATH` is; ValueError (one line, "--data: ...") for a missing or unreadable path."""
    if path == "stdlib":
        return Source("text", path, tuple(data.stdlib_files()))
    if not os.path.exists(path) and not os.path.islink(path):
        raise ValueError(f"--data: no such file or folder {path!r}; give a text file or folder, .jsonl/.parquet "
                         f"records, a .bin/.npy of token ids, or stdlib")
    files = tuple(data.text_files(path))
    if not os.path.isdir(path) and path.endswith(ARRAY_SUFFIXES):
        return Source("array", path, files)
    kinds = {RECORD_KINDS.get(os.path.splitext(f)[1]) for f in files}
    kind = kinds.pop() if len(kinds) == 1 else None
    return Source(kind or "text", path, files)


def cache_root(cfg) -> str:
    """--cache-dir, else $PARATRAIN_CACHE, else ~/.cache/paratrain."""
    return cfg.data.cache_dir or os.environ.get("PARATRAIN_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "paratrain")


# ------------------------------------------------------------------ the public calls
def check_data(cfg) -> None:
    """Before any worker, cheaply: the source, the tokenizer spec, the text field of the first
    record, and the length where it is known without tokenizing. ValueError (one line) else."""
    src = open_source(cfg.data.path)
    kind, _ = parse_spec(cfg.data.tokenizer)
    if kind == "bpe" and src.kind == "array":
        raise ValueError("--tokenizer: bpe:VOCAB is trained on text; a .bin/.npy of token ids takes byte or "
                         "the tokenizer.json its ids come from")
    if kind != "byte" and importlib.util.find_spec("tokenizers") is None:
        raise ValueError("--tokenizer: a tokenizer other than byte needs the `tokenizers` package: "
                         "pip install 'paratrain[hf]'")
    if kind == "file":
        tokenizer_vocab_size(cfg.data.tokenizer)  # reads it: a file that is no tokenizer.json fails here
    if src.kind in RECORD_KINDS.values():
        _need_datasets(src.kind)
        _check_first_record(src, cfg.data.text_field)
    elif src.kind == "array":
        check_length(token_array(src.path).size, cfg.train.seq_len)
    elif src.path != "stdlib":
        data.check_corpus(src.path, cfg.train.seq_len)  # bytes: at least the tokens of a byte-level BPE


def prepare_data(cfg) -> None:
    """In the launcher, before the workers (cheap when the cache holds it all): train the bpe
    tokenizer, tokenize the corpus into the cache, copy the tokenizer to the checkpoint folder."""
    src = open_source(cfg.data.path)
    tok = open_tokenizer(cfg)
    _copy_to_checkpoint(cfg, tok)
    if src.kind == "array":
        max_token_id(src.path, cache_root(cfg))
    elif not _in_memory(src, tok):
        check_length(_cached_tokens(cfg, src, tok)[1]["length"], cfg.train.seq_len)


def open_tokenizer(cfg) -> Tokenizer:
    """The run's tokenizer (bpe:VOCAB: the checkpoint's copy on --resume, else the cache's, trained
    if missing)."""
    if parse_spec(cfg.data.tokenizer)[0] != "bpe":
        return load_tokenizer(cfg.data.tokenizer)
    return HFTokenizer(bpe_file(cfg), name=cfg.data.tokenizer)


def open_tokens(cfg) -> np.ndarray:
    """The corpus as one 1-D array of token ids: a memmap of the cache or of the given array, or
    (byte-level text) the bytes in memory, as `data.load_corpus` reads them."""
    src = open_source(cfg.data.path)
    if src.kind == "array":
        return token_array(src.path)
    tok = open_tokenizer(cfg)
    if _in_memory(src, tok):
        return data.load_corpus(src.path)
    path, meta = _cached_tokens(cfg, src, tok)
    if meta["length"] == 0:
        raise ValueError(f"--data: no text found in {src.path!r}")
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["length"],))


def token_identity(cfg) -> dict:
    """What a run's identity should hold of its data (cheap, JSON-able): the tokenizer's identity
    and the source's kind, file count and bytes (and text field)."""
    src = open_source(cfg.data.path)
    source = {"kind": src.kind, "files": len(src.files), "bytes": sum(os.path.getsize(f) for f in src.files)}
    if src.kind in RECORD_KINDS.values():
        source["text_field"] = cfg.data.text_field
    return {"tokenizer": tokenizer_identity(cfg.data.tokenizer), "source": source}


def data_vocab_size(cfg) -> int:
    """The vocabulary a model needs for this data: the tokenizer's, and for an array of ids also
    its largest id + 1 (read once, then kept in the cache)."""
    vocab = tokenizer_vocab_size(cfg.data.tokenizer)
    src = open_source(cfg.data.path)
    if src.kind == "array":
        vocab = max(vocab, max_token_id(src.path, cache_root(cfg)) + 1)
    return vocab


def check_length(n_tokens: int, seq_len: int) -> None:
    if n_tokens < data.min_corpus_bytes(seq_len):
        raise ValueError(f"--data: the corpus has {n_tokens} tokens, too few for --seq-len {seq_len}; give at least "
                         f"{data.min_corpus_bytes(seq_len)} tokens or a shorter --seq-len")


# ------------------------------------------------------------------ arrays of token ids
def token_array(path: str) -> np.ndarray:
    """A .npy (1-D, integer) or .bin of token ids, memory-mapped; ValueError (one line) else."""
    if path.endswith(".npy"):
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"--data: {path!r} is not a .npy array ({' '.join(str(e).split())[:200]})") from None
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise ValueError(f"--data: {path!r} holds a {a.dtype} array of shape {a.shape}; give a 1-D array of "
                             f"integer token ids")
        return a
    dtype = np.dtype(_bin_dtype(path))
    size = os.path.getsize(path)
    if size == 0 or size % dtype.itemsize:
        raise ValueError(f"--data: {path!r} holds {size} bytes, not a whole number of {dtype} token ids")
    return np.memmap(path, dtype=dtype, mode="r", shape=(size // dtype.itemsize,))


def _bin_dtype(path: str) -> str:
    """uint16 (nanoGPT), unless a sidecar NAME.json (as the cache writes) says uint32."""
    sidecar = os.path.splitext(path)[0] + ".json"
    meta = _read_json(sidecar) if os.path.isfile(sidecar) and os.path.getsize(sidecar) < 1 << 20 else None
    dtype = meta.get("dtype") if isinstance(meta, dict) else None
    return dtype if dtype in ("uint16", "uint32") else "uint16"


def max_token_id(path: str, cache: str | None = None) -> int:
    """The largest id of an array of token ids (read in blocks; kept in `cache` under the file's
    path, size and mtime); ValueError for a negative id."""
    key = os.path.join(cache, "arrays", _hash(_file_stats([path]))[:20] + ".json") if cache else None
    meta = _read_json(key) if key and os.path.isfile(key) else None
    if isinstance(meta, dict) and isinstance(meta.get("max_id"), int):
        return meta["max_id"]
    a, lo, hi = token_array(path), 0, -1
    for i in range(0, a.size, 1 << 24):
        block = a[i : i + (1 << 24)]
        lo, hi = min(lo, int(block.min())), max(hi, int(block.max()))
    if lo < 0:
        raise ValueError(f"--data: {path!r} holds the negative token id {lo}; token ids are 0 or more")
    with contextlib.suppress(OSError):  # a cache that cannot be written: read again next time
        if key:
            _write_json(key, {"path": os.path.abspath(path), "max_id": hi})
    return hi


# ------------------------------------------------------------------ records
def _need_datasets(kind: str) -> None:
    """Without importing it (a worker that validates its config needs no `datasets` in memory)."""
    if importlib.util.find_spec("datasets") is None:
        ext = "jsonl" if kind == "json" else kind
        raise ValueError(f"--data: reading .{ext} needs the `datasets` package: pip install 'paratrain[data]'")


def _check_first_record(src: Source, field: str) -> None:
    """The text field is in the first record of the first file, and holds text."""
    first = src.files[0] if src.files else src.path
    if src.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(first)
        except Exception as e:  # pyarrow's errors for a file that is not Parquet are of several kinds
            raise ValueError(f"--data: {first!r} is not a Parquet file ({' '.join(str(e).split())[:200]})") from None
        names, text = schema.names, field in schema.names and "string" in str(schema.field(field).type)
    else:
        record = _first_json_record(first)
        names, text = list(record), isinstance(record.get(field), str)
    if field not in names:
        raise ValueError(f"--text-field: the records of {first!r} have no field {field!r}; they have "
                         f"{', '.join(map(str, names)) or 'no fields'}")
    if not text:
        raise ValueError(f"--text-field: the field {field!r} of {first!r} does not hold text")


def _first_json_record(path: str) -> dict:
    with open(path, "rb") as fh:
        for line in iter(lambda: fh.readline(64 << 20), b""):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    raise ValueError(f"--data: the first line of {path!r} is not a JSON object; .jsonl/.json "
                                     f"files hold one record per line")
                return record
    raise ValueError(f"--data: {path!r} holds no records")


def _dataset(src: Source, cfg):
    _need_datasets(src.kind)
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(src.kind, data_files=list(src.files), split="train",
                                     cache_dir=os.path.join(cache_root(cfg), "datasets"))
    except Exception as e:  # the builders' errors are of many kinds; each is one unreadable source here
        what = "JSON lines" if src.kind == "json" else "Parquet"
        raise ValueError(f"--data: cannot read {src.path!r} as {what} ({' '.join(str(e).split())[:200]})") from None


def _record_batches(src: Source, cfg) -> tuple[int, Iterator[tuple[list, int]]]:
    field, ds = cfg.data.text_field, _dataset(src, cfg)
    if field not in ds.column_names:
        raise ValueError(f"--text-field: the records of {src.path!r} have no field {field!r}; they have "
                         f"{', '.join(ds.column_names)}")

    def batches():
        for start, batch in zip(itertools.count(0, RECORD_BATCH), ds.select_columns([field]).iter(RECORD_BATCH)):
            texts = batch[field]
            if (bad := next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)) is not None:
                raise ValueError(f"--text-field: record {start + bad} of {src.path!r} holds no text in {field!r}")
            yield texts, len(texts)

    return ds.num_rows, batches()


# ------------------------------------------------------------------ documents -> ids
def _text_batches(src: Source) -> tuple[int, Iterator[tuple[list, int]]]:
    """load_corpus's documents (files in order, binary ones skipped, 64 MiB at most), in batches."""
    cap = data.MAX_CORPUS_BYTES
    total = min(cap, sum(os.path.getsize(f) for f in src.files))

    def batches():
        docs, size, seen = [], 0, 0
        for f in src.files:
            with open(f, "rb") as fh:
                doc = fh.read()
            if data.is_binary(doc):
                continue
            doc = doc[: cap - seen]
            docs.append(doc)
            size, seen = size + len(doc), seen + len(doc)
            if size >= BATCH_BYTES or seen >= cap:
                yield docs, size
                docs, size = [], 0
            if seen >= cap:
                return
        if docs:
            yield docs, size

    return total, batches()


def _batches(src: Source, cfg) -> tuple[int, Iterator[tuple[list, int]]]:
    """(progress total, iterator of (documents, progress units))."""
    return _text_batches(src) if src.kind == "text" else _record_batches(src, cfg)


def _texts(src: Source, cfg) -> Iterator[str]:
    for docs, _ in _batches(src, cfg)[1]:
        yield from (d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in docs)


def _ids(tok: Tokenizer, docs: list) -> np.ndarray:
    """The documents' ids, concatenated (bytes stay as they are with the byte tokenizer)."""
    if isinstance(tok, data.ByteTokenizer):
        return np.frombuffer(b"".join(d if isinstance(d, bytes) else d.encode("utf-8") for d in docs), np.uint8)
    texts = [d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in docs]
    if getattr(tok, "byte_level", False):
        texts = [piece for t in texts for piece in pieces(t)]
    encode = getattr(tok, "encode_batch", None) or (lambda ts: [tok.encode(t) for t in ts])
    ids = encode(texts)
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(map(len, ids)))


def pieces(text: str, size: int | None = None) -> Iterator[str]:
    """`text` cut, past every `size` characters, before the next newline that ends a printable character."""
    size, start = size or PIECE_CHARS, 0
    while len(text) - start > size and (m := _CUT.search(text, start + size)):
        yield text[start : m.start()]
        start = m.start()
    yield text[start:]


# ------------------------------------------------------------------ the cache
def _in_memory(src: Source, tok: Tokenizer) -> bool:
    """Byte-level text: read as `data.load_corpus` does, as before."""
    return src.kind == "text" and isinstance(tok, data.ByteTokenizer)


def bpe_file(cfg) -> str:
    """The tokenizer.json of bpe:VOCAB: the checkpoint folder's copy on --resume, else the cache's
    under (corpus, VOCAB), trained on the corpus's documents when it is not there yet."""
    copy = os.path.join(cfg.checkpoint.dir, "tokenizer.json") if cfg.checkpoint.dir else None
    if cfg.checkpoint.resume and copy and os.path.isfile(copy):
        return copy
    src, vocab = open_source(cfg.data.path), parse_spec(cfg.data.tokenizer)[1]
    if src.kind == "array":
        raise ValueError("--tokenizer: bpe:VOCAB is trained on text; a .bin/.npy of token ids has none")
    path = os.path.join(cache_root(cfg), "tokenizers", f"bpe{vocab}-{_source_key(src, cfg)}", "tokenizer.json")
    if not os.path.isfile(path):
        with _locked(path):
            if not os.path.isfile(path):
                train_bpe(_texts(src, cfg), int(vocab), path, progress=cfg.train.progress and sys.stderr.isatty())
    return path


def _cached_tokens(cfg, src: Source, tok: Tokenizer) -> tuple[str, dict]:
    """The cache's KEY.bin of the source's ids under `tok` and its sidecar, written if missing."""
    content = {"sha256": tok.sha256} if isinstance(tok, HFTokenizer) else tok.identity()  # not where it lies
    key = _hash({"source": _source_key(src, cfg), "tokenizer": content})[:20]
    path = os.path.join(cache_root(cfg), "tokens", key + ".bin")
    meta = _read_meta(path)
    if meta is None:
        with _locked(path):
            meta = _read_meta(path)
            if meta is None:
                meta = _tokenize(path, src, cfg, tok)
                _write_json(path[:-4] + ".json", meta)
    return path, meta


def _tokenize(path: str, src: Source, cfg, tok: Tokenizer) -> dict:
    """Write the source's ids to `path` (a temporary file, renamed when whole); its sidecar."""
    from tqdm import tqdm

    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    total, batches = _batches(src, cfg)
    unit = "B" if src.kind == "text" else " records"
    n, hi, tmp = 0, -1, f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh, tqdm(total=total, unit=unit, unit_scale=True, desc="tokenizing", file=sys.stderr,
                                         disable=None if cfg.train.progress else True) as bar:
            for docs, units in batches:
                ids = _ids(tok, docs)
                if ids.size:
                    ids.astype(dtype).tofile(fh)
                    n, hi = n + ids.size, max(hi, int(ids.max()))
                bar.update(units)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"format": "paratrain tokens", "dtype": dtype.name, "length": n, "max_id": hi,
            "source": {"kind": src.kind, "path": src.path, "files": len(src.files)}, "tokenizer": tok.identity()}


def _read_meta(path: str) -> dict | None:
    """The sidecar of a whole cache file (its size agrees), or None."""
    sidecar = path[:-4] + ".json"
    meta = _read_json(sidecar) if os.path.isfile(sidecar) and os.path.isfile(path) else None
    try:
        if meta and os.path.getsize(path) == meta["length"] * np.dtype(meta["dtype"]).itemsize:
            return meta
    except (KeyError, TypeError):
        pass
    return None


def _copy_to_checkpoint(cfg, tok: Tokenizer) -> None:
    """CHECKPOINT_DIR/tokenizer.json: the run's tokenizer file, which --resume reads back."""
    if not cfg.checkpoint.dir or not isinstance(tok, HFTokenizer):
        return
    dest = os.path.join(cfg.checkpoint.dir, "tokenizer.json")
    if os.path.exists(dest) and os.path.samefile(tok.path, dest):
        return
    os.makedirs(cfg.checkpoint.dir, exist_ok=True)
    tmp = f"{dest}.{os.getpid()}.tmp"
    shutil.copyfile(tok.path, tmp)
    os.replace(tmp, dest)


def _source_key(src: Source, cfg) -> str:
    """The source's files (paths, sizes, mtimes) and what is read of them."""
    what = {"kind": src.kind, "files": _file_stats(src.files)}
    if src.kind == "text":
        what["max_bytes"] = data.MAX_CORPUS_BYTES
    else:
        what["text_field"] = cfg.data.text_field
    return _hash(what)[:16]


def _file_stats(files) -> list:
    return [[os.path.abspath(f), (st := os.stat(f)).st_size, st.st_mtime_ns] for f in files]


@contextlib.contextmanager
def _locked(path: str):
    """One process at a time (flock on PATH.lock): the others wait, then find the file written.
    Without fcntl (Windows) writers race, and each renames a whole file into place."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fh = open(path + ".lock", "a")
    except OSError as e:
        raise ValueError(f"--cache-dir: cannot write in {os.path.dirname(path)!r} ({e.strerror}); give a "
                         f"writable --cache-dir or set PARATRAIN_CACHE") from None
    with fh:
        if fcntl:
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)

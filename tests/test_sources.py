"""Data sources: one text in any format gives the same batches; a BPE is trained once, cached and
kept with the checkpoint; the tokenized corpus is memory-mapped; bad input is one line."""

import importlib.util
import json
import multiprocessing as mp
import os
import shutil
import sysconfig

import numpy as np
import pytest
import torch

from helpers import cli
from paratrain import sources
from paratrain.config import RunConfig
from paratrain.data import TokenLoader, load_corpus
from paratrain.vocab import HFTokenizer, load_tokenizer, tokenizer_vocab_size

STDLIB = sysconfig.get_paths()["stdlib"]
# real text: two standard-library modules and a line beyond ASCII
TEXT = "".join(open(os.path.join(STDLIB, f), encoding="utf-8").read() for f in ("json/decoder.py", "glob.py"))
TEXT += "naïve café, 日本語のテキスト, ✓ ∑ x² — done\n"
SEQ, BATCH = 32, 4


def config(tmp_path, path, tokenizer="byte", **data) -> RunConfig:
    cfg = RunConfig()
    cfg.data.path, cfg.data.tokenizer, cfg.data.cache_dir = str(path), tokenizer, str(tmp_path / "cache")
    for key, value in data.items():
        setattr(cfg.data, key, value)
    cfg.train.seq_len, cfg.train.progress = SEQ, False
    return cfg


def batches(tokens) -> list[torch.Tensor]:
    loader = TokenLoader(tokens, SEQ, BATCH, seed=3, val_fraction=0.05)
    return [loader.batch(k).inputs for k in (1, 2, 7)] + [loader.batch(1, "val").inputs]


def split(text: str, n: int) -> list[str]:
    cuts = [len(text) * i // n for i in range(n + 1)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"id": i, field: t}) + "\n")
    return path


def write_parquet(path, texts, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(texts))), field: texts}), path)
    return path


@pytest.fixture
def formats(tmp_path):
    """The same text as a .txt, .jsonl (several records), .parquet, .npy and .bin of its bytes."""
    ids = np.frombuffer(TEXT.encode("utf-8"), np.uint8)
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    np.save(tmp_path / "ids.npy", ids.astype(np.int32))
    ids.astype(np.uint16).tofile(tmp_path / "ids.bin")
    return {"txt": tmp_path / "text.txt", "jsonl": write_jsonl(tmp_path / "docs.jsonl", split(TEXT, 5)),
            "parquet": write_parquet(tmp_path / "docs.parquet", split(TEXT, 3)),
            "npy": tmp_path / "ids.npy", "bin": tmp_path / "ids.bin"}


def text_of(byte_ids) -> str:
    return bytes(np.asarray(byte_ids, np.uint8)).decode("utf-8")


def prepared(cfg):
    sources.check_data(cfg)
    sources.prepare_data(cfg)
    return sources.open_tokens(cfg)


# ------------------------------------------------------------------ formats agree
@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "npy", "bin"])
def test_every_format_of_one_text_gives_the_txt_batches(tmp_path, formats, fmt):
    reference = batches(prepared(config(tmp_path, formats["txt"])))
    tokens = prepared(config(tmp_path, formats[fmt]))
    assert isinstance(tokens, np.memmap) and tokens.size == len(TEXT.encode("utf-8"))
    for a, b in zip(reference, batches(tokens)):
        assert torch.equal(a, b)


def test_the_default_run_reads_the_stdlib_corpus_as_before():
    cfg = RunConfig()
    sources.check_data(cfg)
    tokens = sources.open_tokens(cfg)
    assert tokens.dtype == np.uint8 and np.array_equal(tokens, load_corpus("stdlib"))


def test_byte_text_stays_as_load_corpus_reads_it(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT[:3000])
    (folder / "b.bin").write_bytes(b"\0\1\2" * 100)  # binary: skipped
    (folder / "c.txt").write_bytes(TEXT[3000:].encode() + b"\xff\xfe not UTF-8\n")
    tokens = prepared(config(tmp_path, folder))
    assert tokens.dtype == np.uint8 and np.array_equal(tokens, load_corpus(str(folder)))
    assert not (tmp_path / "cache" / "tokens").exists()  # nothing cached for byte-level text


def test_records_folder_and_cache_follow_the_files(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, part in enumerate(split(TEXT, 2)):
        write_jsonl(folder / f"part{i}.jsonl", [part])
    cfg = config(tmp_path, folder)
    assert sources.open_source(str(folder)).kind == "json"
    assert text_of(prepared(cfg)) == TEXT
    write_jsonl(folder / "part1.jsonl", [split(TEXT, 2)[1], "one record more"])
    assert text_of(sources.open_tokens(cfg)) == TEXT + "one record more"
    assert len(list((tmp_path / "cache" / "tokens").glob("*.bin"))) == 2


# ------------------------------------------------------------------ bpe
def test_bpe_trains_round_trips_and_is_cached(tmp_path, formats, monkeypatch):
    cfg = config(tmp_path, formats["txt"], "bpe:300")
    tokens = prepared(cfg)
    tok = sources.open_tokenizer(cfg)
    assert tok.vocab_size == 300 == tokenizer_vocab_size("bpe:300") and tok.tok.token_to_id("<|endoftext|>") == 0
    assert tok.decode(tok.encode(TEXT)) == TEXT and np.array_equal(tokens, tok.encode(TEXT))
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    cached = next((tmp_path / "cache" / "tokens").glob("*.bin"))  # with its sidecar, a --data of its own
    assert np.array_equal(sources.open_tokens(config(tmp_path, cached)), tokens)
    assert tokens.size < 0.8 * len(TEXT.encode())  # merges happened
    trained = os.stat(tok.path).st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("trained or tokenized again")

    monkeypatch.setattr(sources, "train_bpe", refuse)
    monkeypatch.setattr(sources, "_tokenize", refuse)
    assert np.array_equal(prepared(cfg), tokens)  # the second prepare reuses both files
    assert os.stat(sources.open_tokenizer(cfg).path).st_mtime_ns == trained


def test_bpe_of_a_txt_and_of_one_record_agree(tmp_path, formats):
    one = write_jsonl(tmp_path / "one.jsonl", [TEXT])
    a = prepared(config(tmp_path, formats["txt"], "bpe:300"))
    b = prepared(config(tmp_path, one, "bpe:300"))
    assert a.dtype == np.uint16 and np.array_equal(a, b)
    for x, y in zip(batches(a), batches(b)):
        assert torch.equal(x, y)


def test_documents_are_encoded_apart_and_concatenated(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = split(TEXT, 2)
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d)
    monkeypatch.setattr(sources, "PIECE_CHARS", 300)  # long documents encoded in pieces: the same ids
    cfg = config(tmp_path, folder, "bpe:320")
    tokens, tok = prepared(cfg), sources.open_tokenizer(cfg)
    assert tok.byte_level and len(list(sources.pieces(docs[0]))) > 5
    assert list(tokens) == tok.encode(docs[0]) + tok.encode(docs[1])


def test_bpe_is_kept_with_the_checkpoint_and_reused_on_resume(tmp_path, formats, monkeypatch):
    cfg = config(tmp_path, formats["jsonl"], "bpe:300")
    cfg.checkpoint.dir = str(tmp_path / "ck")
    tokens = np.array(prepared(cfg))
    copy = tmp_path / "ck" / "tokenizer.json"
    assert copy.read_bytes() == open(sources.bpe_file(cfg), "rb").read()
    shutil.rmtree(tmp_path / "cache")  # the cache is wiped: --resume uses the checkpoint's copy
    monkeypatch.setattr(sources, "train_bpe", lambda *a, **k: pytest.fail("trained again on resume"))
    cfg.checkpoint.resume = True
    assert sources.open_tokenizer(cfg).path == str(copy)
    assert np.array_equal(prepared(cfg), tokens)


def _prepare_logged(cfg, log):
    for name in ("train_bpe", "_tokenize"):
        original = getattr(sources, name)

        def logged(*args, _original=original, _name=name, **kwargs):
            with open(log, "a") as fh:
                fh.write(_name + "\n")
            return _original(*args, **kwargs)

        setattr(sources, name, logged)
    sources.prepare_data(cfg)
    os._exit(0)


def test_processes_preparing_at_once_train_and_tokenize_once(tmp_path, formats):
    cfg, log = config(tmp_path, formats["txt"], "bpe:300"), tmp_path / "log"
    procs = [mp.get_context("fork").Process(target=_prepare_logged, args=(cfg, log)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sorted(log.read_text().split()) == ["_tokenize", "train_bpe"]
    cache = tmp_path / "cache"
    assert not list(cache.rglob("*.tmp"))
    assert np.array_equal(sources.open_tokens(cfg), sources.open_tokenizer(cfg).encode(TEXT))


# ------------------------------------------------------------------ arrays and tokenizers
def test_token_arrays_dtypes_and_vocabulary(tmp_path):
    ids = np.array([5, 999, 70000, 3] * 40, np.uint32)
    ids.tofile(tmp_path / "big.bin")
    (tmp_path / "big.json").write_text(json.dumps({"dtype": "uint32"}))
    cfg = config(tmp_path, tmp_path / "big.bin")
    assert np.array_equal(prepared(cfg), ids) and sources.data_vocab_size(cfg) == 70001
    np.save(tmp_path / "small.npy", np.array([1, 2, 3, 999] * 40, np.int64))
    cfg = config(tmp_path, tmp_path / "small.npy")
    assert sources.open_tokens(cfg).dtype == np.int64 and sources.data_vocab_size(cfg) == 1000
    assert sources.max_token_id(cfg.data.path, cfg.data.cache_dir) == 999  # now from the cache


def test_tokenizer_files_and_folders(tmp_path, formats):
    cfg = config(tmp_path, formats["txt"], "bpe:300")
    prepared(cfg)
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(sources.bpe_file(cfg), folder / "tokenizer.json")
    assert tokenizer_vocab_size(str(folder)) == 300 == tokenizer_vocab_size(str(folder / "tokenizer.json"))
    assert tokenizer_vocab_size("byte") == 256 and tokenizer_vocab_size("bpe:4096") == 4096
    tok = load_tokenizer(str(folder))
    assert isinstance(tok, HFTokenizer) and tok.decode(tok.encode("def f(x):\n")) == "def f(x):\n"
    file_cfg = config(tmp_path, formats["txt"], str(folder))  # the same file by path: the same cached ids
    assert np.array_equal(prepared(file_cfg), prepared(cfg))
    assert len(list((tmp_path / "cache" / "tokens").glob("*.bin"))) == 1
    ident = sources.token_identity(cfg)
    assert ident["tokenizer"] == {"kind": "bpe", "vocab_size": 300} and ident["source"]["kind"] == "text"
    assert json.loads(json.dumps(ident)) == ident


# ------------------------------------------------------------------ bad input
def bad_inputs(tmp_path, formats) -> dict:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "nonsense.json").write_text("hello, not json")
    (tmp_path / "odd.bin").write_bytes(b"\1\2\3")
    np.save(tmp_path / "floats.npy", np.zeros(100))
    (tmp_path / "array.jsonl").write_text("[1, 2]\n")
    txt, jsonl, parquet = formats["txt"], formats["jsonl"], formats["parquet"]
    return {
        "bpe:abc": ((txt, "bpe:abc"), "--tokenizer: 'bpe:abc'"),
        "bpe:10": ((txt, "bpe:10"), "VOCAB >= 257"),
        "no tokenizer file": ((txt, str(tmp_path / "nope.json")), "--tokenizer: no such file"),
        "no tokenizer.json": ((txt, str(tmp_path / "empty_dir")), "holds no tokenizer.json"),
        "not a tokenizer": ((txt, str(tmp_path / "nonsense.json")), "is not a tokenizer.json"),
        "bpe on ids": ((formats["npy"], "bpe:300"), "--tokenizer: bpe:VOCAB is trained on text"),
        "no data": ((tmp_path / "missing.txt", "byte"), "--data: no such file or folder"),
        "jsonl field": ((jsonl, "byte", "body"), "--text-field: the records of"),
        "parquet field": ((parquet, "byte", "body"), "no field 'body'; they have id, text"),
        "field not text": ((jsonl, "byte", "id"), "--text-field: the field 'id'"),
        "not records": ((tmp_path / "array.jsonl", "byte"), "--data: the first line"),
        "odd .bin": ((tmp_path / "odd.bin", "byte"), "not a whole number of uint16"),
        "float .npy": ((tmp_path / "floats.npy", "byte"), "integer token ids"),
    }


@pytest.mark.parametrize("case", ["bpe:abc", "bpe:10", "no tokenizer file", "no tokenizer.json", "not a tokenizer",
                                  "bpe on ids", "no data", "jsonl field", "parquet field", "field not text",
                                  "not records", "odd .bin", "float .npy"])
def test_bad_input_is_one_line_naming_the_flag(tmp_path, formats, case):
    args, expected = bad_inputs(tmp_path, formats)[case]
    path, spec, field = (*args, "text")[:3]
    with pytest.raises(ValueError) as e:
        sources.check_data(config(tmp_path, path, spec, text_field=field))
    message = str(e.value)
    assert expected in message and "\n" not in message and message.startswith("--")


def test_missing_field_names_the_fields_present(tmp_path, formats):
    with pytest.raises(ValueError, match=r"no field 'body'; they have id, text$"):
        sources.check_data(config(tmp_path, formats["jsonl"], text_field="body"))


def test_a_cache_that_cannot_be_written_is_one_line(tmp_path, formats):
    cfg = config(tmp_path, formats["jsonl"])
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    with pytest.raises(ValueError, match=r"^--cache-dir: cannot write in .*; give a writable --cache-dir"):
        sources.prepare_data(cfg)


@pytest.mark.parametrize("package,fmt,spec,message", [
    ("datasets", "parquet", "byte", "--data: reading .parquet needs the `datasets` package: pip install 'paratrain[data]'"),
    ("tokenizers", "txt", "bpe:300", "--tokenizer: a tokenizer other than byte needs the `tokenizers` package: "
                                     "pip install 'paratrain[hf]'")])
def test_a_missing_package_is_named(tmp_path, formats, monkeypatch, package, fmt, spec, message):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ValueError) as e:
        sources.check_data(config(tmp_path, formats[fmt], spec))
    assert str(e.value) == message


# ------------------------------------------------------------------ through the CLI
def run_ok(*args, steps: int = 3):
    p = cli("train", "--model", "tiny", "--dp", "1", "--steps", str(steps), "--global-batch", "4", "--seq-len", "32",
            "--no-progress", *args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "done. loss" in p.stdout + p.stderr
    return p


def test_cli_trains_with_a_bpe_tokenizer(tmp_path, formats):
    ck = tmp_path / "ck"
    run_ok("--data", str(formats["txt"]), "--tokenizer", "bpe:300", "--cache-dir", str(tmp_path / "cache"),
           "--checkpoint-dir", str(ck), "--checkpoint-every", "3")
    assert (ck / "tokenizer.json").read_bytes() == next((tmp_path / "cache").rglob("tokenizer.json")).read_bytes()
    assert len(list((tmp_path / "cache" / "tokens").glob("*.bin"))) == 1


@pytest.mark.slow
def test_cli_resumes_a_bpe_run_with_the_checkpoints_tokenizer(tmp_path, formats):
    ck, cache = tmp_path / "ck", tmp_path / "cache"
    run = ("--data", str(formats["txt"]), "--tokenizer", "bpe:300", "--cache-dir", str(cache), "--checkpoint-dir",
           str(ck), "--checkpoint-every", "2")
    run_ok(*run, steps=4)
    shutil.rmtree(ck / "step_00000004")
    shutil.rmtree(cache)
    p = run_ok(*run, "--resume", steps=4)
    assert "resumed from" in p.stdout and "step_00000002" in p.stdout
    assert not list(cache.rglob("tokenizer.json"))  # not trained again: the checkpoint's copy was used


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "npy"])
def test_cli_trains_on_records_and_token_arrays(tmp_path, formats, fmt):
    run_ok("--data", str(formats[fmt]), "--cache-dir", str(tmp_path / "cache"))

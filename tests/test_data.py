"""Data: the global batch is a function of (seed, step) alone; dp ranks take slices of it."""

import numpy as np
import pytest
import torch

from paratrain.data import ByteTokenizer, TokenLoader, load_corpus, split_microbatches, stdlib_files


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("stdlib", max_bytes=2 << 20)


def test_stdlib_corpus_is_real_python_text(corpus):
    files = stdlib_files()
    assert len(files) > 500 and all(f.endswith(".py") and "site-packages" not in f for f in files)
    text = bytes(corpus[:200_000]).decode("utf-8")
    assert "def " in text and "import " in text


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    s = "naïve café: def f(x):\n    return x ** 2  # ✓"
    ids = tok.encode(s)
    assert max(ids) < 256 and tok.decode(ids) == s


def test_batch_depends_only_on_seed_and_step(corpus):
    a = TokenLoader(corpus, seq_len=32, global_batch=8, seed=7)
    b = TokenLoader(corpus, seq_len=32, global_batch=8, seed=7)
    c = TokenLoader(corpus, seq_len=32, global_batch=8, seed=8)
    assert torch.equal(a.batch(5).inputs, b.batch(5).inputs)
    assert not torch.equal(a.batch(5).inputs, a.batch(6).inputs)
    assert not torch.equal(a.batch(5).inputs, c.batch(5).inputs)
    batch = a.batch(3)
    assert batch.inputs.shape == (8, 32) and batch.inputs.dtype == torch.int64
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # targets are the next bytes


@pytest.mark.parametrize("dp", [1, 2, 4, 8])
@pytest.mark.parametrize("microbatches", [1, 2])
def test_dp_slices_and_microbatches_rebuild_the_global_batch(corpus, dp, microbatches):
    loader = TokenLoader(corpus, seq_len=16, global_batch=16, seed=1)
    full = loader.batch(4)
    pieces = [
        mb.inputs
        for r in range(dp)
        for mb in split_microbatches(loader.local_batch(4, r, dp), microbatches)
    ]
    assert all(p.shape == (16 // dp // microbatches, 16) for p in pieces)
    assert torch.equal(torch.cat(pieces), full.inputs)


def test_loader_state_restores_exactly(corpus):
    a = TokenLoader(corpus, seq_len=16, global_batch=4, seed=3)
    for _ in range(5):
        a.next(0, 1)
    state = a.state_dict()
    expected = [a.next(1, 2).inputs for _ in range(3)]
    b = TokenLoader(corpus, seq_len=16, global_batch=4, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next(1, 2).inputs) for x in expected)
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(corpus, seq_len=16, global_batch=4, seed=4).load_state_dict(state)


def test_validation_split_is_held_out(corpus):
    loader = TokenLoader(corpus, seq_len=16, global_batch=4, seed=0, val_fraction=0.1)
    train, val = loader.splits["train"], loader.splits["val"]
    assert train.size + val.size == corpus.size
    assert np.array_equal(val, corpus[-val.size :])
    assert val.size == int(corpus.size * 0.1)


def test_text_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second file " * 100)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)  # binary files are skipped
    assert load_corpus(str(tmp_path / "a.txt")).size == 1200
    both = load_corpus(str(tmp_path))
    assert both.size == 2400 and bytes(both[:5]) == b"hello"


def test_decode_survives_ids_past_the_bytes():
    from paratrain.data import ByteTokenizer

    assert ByteTokenizer().decode([100, 50000, 101]) == "d\ufffde"

"""Byte-level text data whose global batch depends only on (seed, step), never on the layout.

The corpus is one stream of bytes (default: the running Python's standard library sources, a
real text corpus present on every machine). Its tail is held out for validation. The batch of
step k is drawn with a counter-based generator seeded by (seed, split, k), so every layout sees
the same sequences, each data-parallel rank takes its contiguous slice, and the loader's whole
state is the next step number: saving and restoring it is exact.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass

import numpy as np
import torch

from paratrain.files import regular_file

VOCAB_SIZE = 256
MAX_CORPUS_BYTES = 64 << 20  # what load_corpus reads of a text corpus at most


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255. Lossless for any text, no vocabulary file to ship."""

    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """Ids past 255 (a model with a padded vocabulary, untrained) become U+FFFD."""
        return bytes(int(i) if 0 <= int(i) < 256 else 0xFF for i in ids).decode("utf-8", errors="replace")


def stdlib_files() -> list[str]:
    """The `.py` files of the running Python's standard library (third-party packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return files


def text_files(path: str) -> list[str]:
    """The corpus files of `path` (itself, or the files of a folder, hidden ones skipped), in sorted
    order. Each must be a readable regular file, learnt from os.stat without opening it (a FIFO
    would block): a dangling link, a FIFO, a device or socket is a ValueError naming it."""
    if not os.path.isdir(path):
        return [_corpus_file(path, "give a text file or a folder of them")]
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(_corpus_file(os.path.join(dirpath, f), "take it out of the folder")
                     for f in sorted(filenames) if not f.startswith("."))
    return files


def _corpus_file(path: str, fix: str) -> str:
    try:
        regular_file(path, "text file")
    except ValueError as e:
        raise ValueError(f"--data: {e}; {fix}") from None
    if not os.access(path, os.R_OK):
        raise ValueError(f"--data: cannot read {path!r} (permission denied); {fix}")
    return path


def load_corpus(path: str = "stdlib", max_bytes: int = MAX_CORPUS_BYTES) -> np.ndarray:
    """Read the corpus into one uint8 array (files in sorted order, at most `max_bytes`)."""
    files = stdlib_files() if path == "stdlib" else text_files(path)
    chunks, total = [], 0
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        if is_binary(data):  # skipped in a user's folder
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    corpus = np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)
    if corpus.size == 0:
        raise ValueError(f"--data: no text found in {path!r}")
    return corpus


def check_corpus(path: str, seq_len: int) -> None:
    """Raise ValueError (one line) unless `path` holds the text a TokenLoader of `seq_len` needs,
    by load_corpus's rules; reads no more than it must, so a run can check before it starts."""
    total = 0
    for f in text_files(path):
        try:
            with open(f, "rb") as fh:
                if is_binary(fh.read(4096)):
                    continue
                total += os.fstat(fh.fileno()).st_size
        except OSError as e:
            raise ValueError(f"--data: cannot read {f!r} ({e.strerror})") from None
        if total >= min_corpus_bytes(seq_len):
            return
    if total == 0:
        raise ValueError(f"--data: no text found in {path!r}; give a text file or a folder of text files")
    check_corpus_size(total, seq_len)


def is_binary(head: bytes) -> bool:
    """A file whose first 4 KiB hold a NUL byte is not text."""
    return b"\0" in head[:4096]


def min_corpus_bytes(seq_len: int) -> int:
    """Bytes a TokenLoader needs: windows of seq_len + 1 for both the training and validation splits."""
    return 4 * (seq_len + 1)


def check_corpus_size(size: int, seq_len: int) -> None:
    if size < min_corpus_bytes(seq_len):
        raise ValueError(f"--data: the corpus has {size} bytes, too few for --seq-len {seq_len}; "
                         f"give at least {min_corpus_bytes(seq_len)} bytes of text or a shorter --seq-len")


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, inputs shifted by one


class DataPosition:
    """A data source's place in its batches: the next step, and the seed that fixes every batch.
    Saving and restoring it is exact (it is what a checkpoint keeps of the data)."""

    def __init__(self, seed: int):
        self.step, self.seed = 1, seed

    def next(self, dp_rank: int, dp: int):
        """This rank's slice of the next training batch; advances the position."""
        b = self.local_batch(self.step, dp_rank, dp)
        self.step += 1
        return b

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.step = int(state["step"])


class TokenLoader(DataPosition):
    """Deterministic batches of `global_batch` windows of `seq_len + 1` bytes.

    `batch(step)` is the same on every rank and in every layout; `local_batch(step, dp_rank, dp)`
    is this rank's contiguous slice of it, and `microbatches(...)` splits that slice further.
    """

    def __init__(
        self,
        corpus: np.ndarray,
        seq_len: int,
        global_batch: int,
        seed: int,
        val_fraction: float = 0.05,
    ):
        check_corpus_size(corpus.size, seq_len)
        n_val = max(int(corpus.size * val_fraction), 2 * (seq_len + 1))
        self.splits = {"train": corpus[:-n_val], "val": corpus[-n_val:]}
        self.seq_len = seq_len
        self.global_batch = global_batch
        super().__init__(seed)  # the next training step to serve: the loader's whole state

    def batch(self, step: int, split: str = "train") -> Batch:
        data = self.splits[split]
        rng = np.random.default_rng([self.seed, {"train": 0, "val": 1}[split], step])
        starts = rng.integers(0, data.size - self.seq_len - 1, size=self.global_batch)
        windows = np.stack([data[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        w = torch.from_numpy(windows)
        return Batch(inputs=w[:, :-1], targets=w[:, 1:])

    def local_batch(self, step: int, dp_rank: int, dp: int, split: str = "train") -> Batch:
        n = self.global_batch // dp
        return self.rows(step, dp_rank * n, (dp_rank + 1) * n, split)

    def rows(self, step: int, start: int, stop: int, split: str = "train") -> Batch:
        """Rows [start, stop) of step `step`'s global batch (a replica's share under --balance dynamic)."""
        full = self.batch(step, split)
        return Batch(inputs=full.inputs[start:stop], targets=full.targets[start:stop])

    def validation(self) -> "_Split":
        """The held-out split as a data source (the same windows in every layout)."""
        return _Split(self, "val")


def split_microbatches(batch: Batch, n: int) -> list[Batch]:
    return [Batch(i, t) for i, t in zip(batch.inputs.chunk(n), batch.targets.chunk(n))]


# ------------------------------------------------------------------ any model's batches
def split_batch(x, n: int | list[int]) -> list:
    """`x` (a tensor, or tuples, lists and dicts of them) as `n` equal micro-batches along dim 0, or
    as micro-batches of the rows `n` lists; anything that is not a tensor is given to every
    micro-batch as it is."""
    if isinstance(n, list):
        if torch.is_tensor(x):
            if x.dim() == 0 or x.shape[0] != sum(n):
                raise ValueError(f"a batch of {x.shape[0] if x.dim() else 'no'} rows does not split into {n}")
            return list(x.split(n))
        count = len(n)
    else:
        count = n
    if torch.is_tensor(x):
        if x.dim() == 0 or x.shape[0] % n:
            raise ValueError(f"a batch of {x.shape[0] if x.dim() else 'no'} rows does not split into {n} micro-batches")
        return list(x.chunk(n))
    if isinstance(x, dict):
        parts = {k: split_batch(v, n) for k, v in x.items()}
        return [{k: parts[k][i] for k in x} for i in range(count)]
    if isinstance(x, (tuple, list)):
        parts = [split_batch(v, n) for v in x]
        return [type(x)(p[i] for p in parts) for i in range(count)]
    return [x] * count


def take_rows(x, start: int, stop: int):
    """Rows [start, stop) of every tensor in `x` (tensors, tuples, lists and dicts of them)."""
    if torch.is_tensor(x):
        return x[start:stop] if x.dim() else x
    if isinstance(x, dict):
        return {k: take_rows(v, start, stop) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(take_rows(v, start, stop) for v in x)
    return x


def batch_rows(source, step: int, start: int, stop: int):
    """Rows [start, stop) of step `step`'s global batch from `source`: its own `rows`, else the
    whole global batch (`local_batch(step, 0, 1)`) cut."""
    if hasattr(source, "rows"):
        return source.rows(step, start, stop)
    full = source.local_batch(step, 0, 1)
    if isinstance(full, Batch):
        return Batch(full.inputs[start:stop], full.targets[start:stop])
    return take_rows(full, start, stop)


def to_device(x, device: torch.device):
    """`x` with every tensor in it moved to `device`."""
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def first_tensor(x) -> torch.Tensor | None:
    if torch.is_tensor(x):
        return x
    for v in x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ():
        if (t := first_tensor(v)) is not None:
            return t
    return None


def call_model(model: torch.nn.Module, inputs):
    """A dict of inputs as keyword arguments (Hugging Face models), a tuple as positional ones."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def as_pair(batch) -> tuple:
    """(inputs, targets) of a Batch, a pair, or inputs alone (targets None: the model's
    output carries its loss, as a Hugging Face model given `labels` does)."""
    if isinstance(batch, Batch):
        return batch.inputs, batch.targets
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


class DatasetLoader(DataPosition):
    """A map-style `Dataset` as global batches that depend only on (seed, step): step k takes
    `global_batch` consecutive indices of the epoch's permutation (seeded by (seed, epoch);
    the last incomplete batch of an epoch is dropped), each data-parallel rank its contiguous
    slice, collated with `collate_fn` (torch's default). Ranks of one replica (tp, pp) ask for
    the same slice and get the same batch. State: the next step, as for `TokenLoader`."""

    def __init__(self, dataset, global_batch: int, seed: int = 0, shuffle: bool = True, collate_fn=None):
        from torch.utils.data import default_collate

        super().__init__(seed)
        self.dataset, self.global_batch, self.shuffle = dataset, global_batch, shuffle
        self.collate = collate_fn or default_collate
        self.num_batches = len(dataset) // global_batch  # per epoch
        if self.num_batches == 0:
            raise ValueError(f"data: a dataset of {len(dataset)} items holds no global batch of {global_batch}")
        self._order: tuple[int, np.ndarray] | None = None

    def _indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(step - 1, self.num_batches)
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            order = np.random.default_rng([self.seed, 2, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order)
        return self._order[1][k * self.global_batch : (k + 1) * self.global_batch]

    def local_batch(self, step: int, dp_rank: int, dp: int):
        if self.global_batch % dp:
            raise ValueError(f"data: a global batch of {self.global_batch} does not split over dp={dp}")
        n = self.global_batch // dp
        return self.rows(step, dp_rank * n, (dp_rank + 1) * n)

    def rows(self, step: int, start: int, stop: int):
        """Items [start, stop) of step `step`'s global batch, collated."""
        idx = self._indices(step)[start:stop]
        return self.collate([self.dataset[int(i)] for i in idx])


class _Split:
    """One split of a TokenLoader, as a data source of its own (evaluation)."""

    def __init__(self, loader: "TokenLoader", split: str):
        self.loader, self.split = loader, split

    def local_batch(self, step: int, dp_rank: int, dp: int) -> Batch:
        return self.loader.local_batch(step, dp_rank, dp, split=self.split)


def token_batches(tokens, seq_len: int, global_batch: int, seed: int = 0, val_fraction: float = 0.05) -> "TokenLoader":
    """A token source (a 1-D array or tensor of token ids, e.g. a tokenized corpus) as windows of
    `seq_len` tokens and their next-token targets, the batch of step k a function of (seed, k)."""
    arr = tokens.numpy() if torch.is_tensor(tokens) else np.asarray(tokens)
    return TokenLoader(arr.reshape(-1), seq_len, global_batch, seed, val_fraction)

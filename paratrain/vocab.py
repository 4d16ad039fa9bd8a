"""Tokenizers: text <-> token ids, named by a spec string (`--tokenizer`).

`byte` is UTF-8 bytes (ids 0..255, no file); a path is a Hugging Face `tokenizer.json` (or a folder
holding one) read with the `tokenizers` library; `bpe:VOCAB` is a byte-level BPE (GPT-2's scheme:
Radford et al. 2019, after Sennrich et al. 2016) trained on the run's corpus by `train_bpe`.
Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Iterable, Protocol

from paratrain import data

SPECIALS = ["<|endoftext|>"]  # the special tokens of a trained BPE, ids 0.. in this order
MIN_BPE_VOCAB = 256 + len(SPECIALS)  # every byte, and the specials
SPEC_HELP = "give byte, bpe:VOCAB, a tokenizer.json or a folder holding one (nothing is downloaded)"
NEEDS = "needs the `tokenizers` package: pip install 'paratrain[hf]'"


class Tokenizer(Protocol):
    """What the data and sampling code use of a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...

    def identity(self) -> dict: ...


class ByteTokenizer(data.ByteTokenizer):
    """data.ByteTokenizer with a name and an identity."""

    name = "byte"

    def identity(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size}


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from a tokenizer.json. Documents are encoded without the
    tokenizer's added special tokens (a BOS, say): the corpus is the documents' ids, concatenated."""

    def __init__(self, path: str, name: str | None = None):
        Tok = _tokenizers().Tokenizer
        self.path, self.name = path, name or path
        try:
            self.tok = Tok.from_file(path)
        except Exception as e:  # the library's errors are of several kinds, all one thing here
            raise ValueError(f"--tokenizer: {path!r} is not a tokenizer.json ({_first_line(e)})") from None
        self.sha256 = file_sha256(path)
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        pre = self.tok.pre_tokenizer  # GPT-2's pre-tokenizer: a long text may be encoded in pieces (sources.py)
        self.byte_level = type(pre).__name__ == "ByteLevel" and pre.use_regex and not pre.add_prefix_space

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)  # fast: no offsets
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Ids past the vocabulary (a model with a padded one, untrained) are left out."""
        return self.tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def identity(self) -> dict:
        return {"kind": "bpe" if self.name.startswith("bpe:") else "file", "sha256": self.sha256,
                "vocab_size": self.vocab_size}


def parse_spec(spec: str) -> tuple[str, int | str | None]:
    """("byte", None), ("bpe", VOCAB) or ("file", the tokenizer.json); ValueError (one line) else."""
    if spec == "byte":
        return "byte", None
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:])
        except ValueError:
            raise ValueError(f"--tokenizer: {spec!r}: VOCAB must be a whole number, e.g. bpe:4096") from None
        if vocab < MIN_BPE_VOCAB:
            raise ValueError(f"--tokenizer: {spec!r}: a byte-level BPE needs VOCAB >= {MIN_BPE_VOCAB} "
                             f"(256 bytes and {len(SPECIALS)} special token), e.g. bpe:4096")
        return "bpe", vocab
    if not os.path.exists(spec):
        raise ValueError(f"--tokenizer: no such file or folder {spec!r}; {SPEC_HELP}")
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ValueError(f"--tokenizer: the folder {spec!r} holds no tokenizer.json; {SPEC_HELP}")
    return "file", path


def tokenizer_vocab_size(spec: str) -> int:
    """The vocabulary a model needs for `spec`, without training anything: 256 for byte, VOCAB for
    bpe:VOCAB (an upper bound: a corpus too small for VOCAB - 257 merges gives fewer), the
    tokenizer.json's largest id + 1 otherwise."""
    kind, arg = parse_spec(spec)
    if kind == "byte":
        return data.VOCAB_SIZE
    if kind == "bpe":
        return int(arg)
    return _file_facts(str(arg))["vocab_size"]


def tokenizer_identity(spec: str) -> dict:
    """What fixes the ids of `spec`, cheaply (no training): a bpe:VOCAB is a function of the corpus,
    so its vocabulary says it with the corpus identity; a file is its content's hash."""
    kind, arg = parse_spec(spec)
    if kind == "byte":
        return ByteTokenizer().identity()
    if kind == "bpe":
        return {"kind": "bpe", "vocab_size": int(arg)}
    return _file_facts(str(arg))


def _file_facts(path: str) -> dict:
    """A tokenizer file's identity, read once per process while the file stays the same."""
    st = os.stat(path)
    return dict(_read_facts(os.path.abspath(path), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _read_facts(path: str, size: int, mtime_ns: int) -> tuple:
    return tuple(HFTokenizer(path).identity().items())


def load_tokenizer(spec_or_path: str, name: str | None = None) -> Tokenizer:
    """`byte`, or the tokenizer.json `spec_or_path` names (a bpe:VOCAB is trained by paratrain.sources)."""
    kind, arg = parse_spec(spec_or_path)
    if kind == "bpe":
        raise ValueError("--tokenizer: bpe:VOCAB is trained on a corpus: open it with paratrain.sources.open_tokenizer")
    return ByteTokenizer() if kind == "byte" else HFTokenizer(str(arg), name)


def train_bpe(texts: Iterable[str], vocab: int, path: str, progress: bool = False) -> None:
    """Train a byte-level BPE of `vocab` ids on `texts` (documents) and save it to `path` as
    tokenizer.json (written beside it, then renamed: a reader never sees half a file)."""
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=progress,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tmp = f"{path}.{os.getpid()}.tmp"
    tok.save(tmp)
    os.replace(tmp, path)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ValueError(f"--tokenizer: a tokenizer other than byte {NEEDS}") from None
    return tokenizers


def _first_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


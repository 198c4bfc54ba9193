"""Byte-level text data for language models: cached token files, document-level validation.

Tokens are the raw UTF-8 bytes (vocab 256), so there is no tokenizer to train, ship or
version, and every byte sequence decodes. A corpus is a folder (every ``*.txt`` file under it,
sorted by relative path, is one document; other files such as ``SOURCES.ini`` and anything
under a hidden folder are skipped) or a single text file, which is cut into ``pieces``
(default 100) contiguous pieces of about equal size, each ending just after a newline, so no
line and no multi-byte character is split; a piece is one document named ``file.txt#k``.

Validation holds out whole documents: a seeded choice whose bytes come as close as whole
documents allow to ``val_fraction`` of the corpus (at least one document, never all). Held-out
text therefore never shares a play, chapter or article with the training text, which a split
at a byte offset inside one file would not guarantee across documents.

The tokens of each split are written once, as flat ``uint8`` files under
``cache_dir/<corpus name>-<key>/`` where the key hashes the documents' names, sizes and
modification times with ``val_fraction``, ``seed`` and ``pieces``. Every file is written into a
private temporary folder that is then renamed into place, so concurrent workers never see a
half-written cache (the losers of a race simply discard theirs) and a crash leaves no partial
cache behind. Nothing is ever written under the data folder. Later calls memory-map the files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from localsgd.data.errors import DataError
from localsgd.data.loaders import mix_seed

VOCAB_SIZE = 256
CACHE_FORMAT = 1
_META = "meta.json"


class TextDataError(DataError, ValueError):
    """Text data that cannot be used; the one-line message names the file or folder and the
    fix. A :class:`DataError`, so the CLI reports it like any other data problem."""


@dataclass
class TextSplits:
    """Token streams of one corpus, split by document."""

    train: np.memmap
    """uint8 tokens of the training documents, concatenated in name order."""
    val: np.memmap
    """uint8 tokens of the held-out documents (whole documents, disjoint from train)."""
    vocab_size: int
    """Number of distinct token values: 256 (bytes)."""
    train_docs: list[str]
    """Training document names (paths relative to the corpus root, ``#k`` for file pieces)."""
    val_docs: list[str]
    """Held-out document names."""
    cache_path: Path | None = None
    """Folder holding this corpus's cached token files."""


@dataclass(frozen=True)
class _Doc:
    name: str
    path: Path
    size: int
    mtime_ns: int


def load_text(
    root: str | Path,
    cache_dir: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    pieces: int = 100,
) -> TextSplits:
    """Token splits of the corpus at ``root``, building the cache under ``cache_dir`` once.

    ``pieces`` only matters when ``root`` is a single file (see the module docstring).
    Raises :class:`TextDataError` for a missing path, a folder without text files, an empty
    or binary file, a cache folder inside the data folder, or an impossible split.
    """
    root, cache_dir = Path(root), Path(cache_dir)
    if not 0.0 < val_fraction < 1.0:
        raise TextDataError(
            f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}; "
            f"fix: choose e.g. 0.1"
        )
    if pieces < 2:
        raise TextDataError(f"pieces must be at least 2, got {pieces}")
    docs = _find_documents(root)
    _check_cache_outside(root, cache_dir)
    key = _cache_key(root, docs, val_fraction, seed, pieces)
    final = cache_dir / f"{root.stem or 'text'}-{key}"
    if not (final / _META).exists():
        _build_cache(root, docs, final, val_fraction, seed, pieces)
    return _open_cache(final)


def _find_documents(root: Path) -> list[_Doc]:
    if not root.exists():
        raise TextDataError(
            f"text data path {root} does not exist; fix: point it at a folder of .txt files "
            f"or at one UTF-8 text file"
        )
    if root.is_file():
        paths = [(root.name, root)]
    else:
        found = sorted(
            p for p in root.rglob("*.txt")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        paths = [(p.relative_to(root).as_posix(), p) for p in found]
        if not paths:
            others = sum(1 for p in root.rglob("*") if p.is_file())
            raise TextDataError(
                f"no .txt files under {root} ({others} other files); fix: add UTF-8 text "
                f"files named *.txt or point the path at a single text file"
            )
    docs = []
    for name, path in paths:
        st = path.stat()
        if st.st_size == 0:
            raise TextDataError(f"text file {path} is empty; fix: remove it or add text")
        docs.append(_Doc(name, path, st.st_size, st.st_mtime_ns))
    return docs


def _check_cache_outside(root: Path, cache_dir: Path) -> None:
    if root.is_dir():
        data, cache = root.resolve(), cache_dir.resolve()
        if cache == data or data in cache.parents:
            raise TextDataError(
                f"cache folder {cache_dir} is inside the data folder {root}; fix: choose a "
                f"cache folder outside it (the data folder is never written to)"
            )


def _cache_key(
    root: Path, docs: list[_Doc], val_fraction: float, seed: int, pieces: int
) -> str:
    desc = {
        "format": CACHE_FORMAT,
        "root": str(root.resolve()),
        "docs": [[d.name, d.size, d.mtime_ns] for d in docs],
        "val_fraction": val_fraction,
        "seed": seed,
        "pieces": pieces if root.is_file() else None,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def check_text(name: str | Path, data: bytes) -> None:
    """TextDataError unless ``data`` is non-empty UTF-8 text without NUL bytes."""
    if not data:
        raise TextDataError(f"text file {name} is empty; fix: remove it or add text")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise TextDataError(
            f"{name} is not text: NUL byte at byte offset {nul}; fix: remove the file or "
            f"convert it to UTF-8 text"
        )
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextDataError(
            f"{name} is not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset "
            f"{exc.start}; fix: re-encode the file as UTF-8 or remove it"
        ) from None


def split_pieces(data: bytes, pieces: int) -> list[bytes]:
    """``data`` cut into at most ``pieces`` parts of about equal size, each ending after a
    newline (the last one at the end of the data)."""
    out, start = [], 0
    for k in range(1, pieces):
        target = max(start, len(data) * k // pieces)
        cut = data.find(b"\n", target)
        if cut < 0:
            break
        if cut + 1 > start and cut + 1 < len(data):
            out.append(data[start : cut + 1])
            start = cut + 1
    out.append(data[start:])
    return out


def choose_val(sizes: list[int], val_fraction: float, seed: int) -> set[int]:
    """Indices of the held-out documents: in a seeded random order, each document joins if
    it brings the held-out bytes closer to ``val_fraction`` of the total; at least one,
    never all (at least one document stays for training)."""
    target = val_fraction * sum(sizes)
    order = np.random.default_rng(seed).permutation(len(sizes))
    chosen: set[int] = set()
    held = 0
    for i in order.tolist():
        full = len(chosen) == len(sizes) - 1
        if not full and abs(held + sizes[i] - target) < abs(held - target):
            chosen.add(i)
            held += sizes[i]
    if not chosen:
        chosen.add(int(order[0]))
    return chosen


def _build_cache(
    root: Path, docs: list[_Doc], final: Path, val_fraction: float, seed: int, pieces: int
) -> None:
    if root.is_file():
        data = root.read_bytes()
        check_text(root, data)
        contents = split_pieces(data, pieces)
        names = [f"{root.name}#{k}" for k in range(len(contents))]
        sizes = [len(c) for c in contents]
    else:
        contents = None
        names = [d.name for d in docs]
        sizes = [d.size for d in docs]
    if len(names) < 2:
        raise TextDataError(
            f"{root} holds a single document, so none can be held out for validation; fix: "
            f"add more .txt files (or more lines to the file)"
        )
    val = choose_val(sizes, val_fraction, seed)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
            for i in range(len(names)):
                if contents is None:
                    chunk = docs[i].path.read_bytes()
                    check_text(docs[i].path, chunk)
                else:
                    chunk = contents[i]
                (fval if i in val else ftrain).write(chunk)
            for f in (ftrain, fval):
                f.flush()
                os.fsync(f.fileno())
        meta = {
            "format": CACHE_FORMAT,
            "train_docs": [n for i, n in enumerate(names) if i not in val],
            "val_docs": [n for i, n in enumerate(names) if i in val],
            "train_tokens": sum(s for i, s in enumerate(sizes) if i not in val),
            "val_tokens": sum(s for i, s in enumerate(sizes) if i in val),
            "val_fraction": val_fraction,
            "seed": seed,
        }
        (tmp / _META).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError as exc:
            # Another worker renamed its identical copy first: keep theirs.
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (final / _META).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _open_cache(final: Path) -> TextSplits:
    try:
        meta = json.loads((final / _META).read_text())
        train = np.memmap(final / "train.bin", dtype=np.uint8, mode="r")
        val = np.memmap(final / "val.bin", dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise TextDataError(
            f"text cache {final} is unreadable ({exc}); fix: delete that folder to rebuild it"
        ) from None
    if (len(train), len(val)) != (meta["train_tokens"], meta["val_tokens"]):
        raise TextDataError(
            f"text cache {final} does not match its {_META}; fix: delete that folder"
        )
    return TextSplits(train, val, VOCAB_SIZE, meta["train_docs"], meta["val_docs"], final)


class TextWindows(Dataset):
    """Non-overlapping windows of ``context + 1`` tokens: item i is ``(x, y)`` with
    ``x = tokens[s : s + context]`` and ``y = tokens[s + 1 : s + context + 1]`` for
    ``s = offset + i * context``.

    The length is ``(len(tokens) - 1) // context`` whatever the offset: with an offset > 0
    the last window continues from the start of the stream, so every epoch has the same
    number of windows (the distributed sampler fixes its shard sizes at construction) and the
    inputs of different windows never share a token. ``set_epoch`` shifts the windows per
    epoch; it changes this object, so use it with ``num_workers=0`` or non-persistent
    loader workers (a persistent worker keeps the copy it started with).
    """

    def __init__(
        self, tokens: np.ndarray, context: int, offset: int = 0, name: str = "data"
    ) -> None:
        if context < 1:
            raise TextDataError(f"context must be positive, got {context}")
        n = len(tokens)
        if n < context + 1:
            raise TextDataError(
                f"context {context} is longer than the data: the {name} split has {n} tokens "
                f"and one window needs context + 1 = {context + 1}; fix: lower the context "
                f"or use more text"
            )
        if not 0 <= offset < context:
            raise TextDataError(f"offset must be in [0, context={context}), got {offset}")
        self.tokens = tokens
        self.context = context
        self.offset = offset
        self.name = name
        self._len = (n - 1) // context

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Draw this epoch's offset in [0, context) from (seed, epoch): deterministic, so a
        resumed epoch sees the same windows."""
        self.offset = mix_seed(seed, epoch) % self.context

    def window(self, i: int) -> np.ndarray:
        """The ``context + 1`` tokens of window ``i``."""
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} out of range for {self._len} windows")
        start = self.offset + i * self.context
        end = start + self.context + 1
        if end <= len(self.tokens):
            return np.asarray(self.tokens[start:end])
        return np.concatenate((self.tokens[start:], self.tokens[: end - len(self.tokens)]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(self.window(i).astype(np.int64))
        return w[:-1], w[1:]

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict[str, object]:
        # Loader workers started by spawn/forkserver receive a pickled copy; a whole-file
        # memmap travels as its path instead of as a copy of the whole token stream.
        state = dict(self.__dict__)
        t = self.tokens
        if (isinstance(t, np.memmap) and t.filename and t.ndim == 1 and t.offset == 0
                and t.strides == (t.itemsize,)
                and t.nbytes == os.path.getsize(t.filename)):
            state["tokens"] = (str(t.filename), t.dtype.str)
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        tokens = state["tokens"]
        if isinstance(tokens, tuple):
            filename, dtype = tokens
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r")
        self.__dict__.update(state)

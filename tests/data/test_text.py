"""Byte-level text data: the token cache, the document-level split, windows, partitioning by
the real distributed sampler with mid-epoch resume, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from localsgd.data.errors import DataError
from localsgd.data.loaders import ResumableDistributedSampler, build_train_loader
from localsgd.data.text import (
    TextDataError,
    TextWindows,
    choose_val,
    load_text,
    split_pieces,
)

SHAKESPEARE = REPO.parent / "shared" / "data" / "shakespeare"


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder``: size, mtime and content hash."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns,
                                           hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Twelve documents of different sizes with multi-byte characters, plus a non-text file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    words = ["to", "be", "or", "not", "café", "naïve", "thou", "art", "—", "\n"]
    for k in range(12):
        text = " ".join(rng.choice(words, size=int(rng.integers(200, 2000))))
        folder = root / "sub" if k % 3 == 0 else root
        (folder / f"doc{k:02d}.txt").write_text(text + "\n", encoding="utf-8")
    (root / "SOURCES.ini").write_text("[doc00]\nurl = nowhere\n")
    return root


def _one_line(err: pytest.ExceptionInfo[TextDataError]) -> str:
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, DataError)
    return msg


def test_cache_written_once_and_root_untouched(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _snapshot(corpus)
    cache = tmp_path / "cache"
    first = load_text(corpus, cache)
    written = _snapshot(cache)
    assert {Path(n).name for n in written} == {"train.bin", "val.bin", "meta.json"}

    import localsgd.data.text as text

    def no_build(*args: object) -> None:
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(text, "_build_cache", no_build)
    second = load_text(corpus, cache)
    assert _snapshot(cache) == written  # same files, same mtimes: read, not rewritten
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert second.val_docs == first.val_docs
    assert _snapshot(corpus) == before

    # Another seed is another split, hence another cache entry; the first one stays.
    monkeypatch.undo()
    third = load_text(corpus, cache, seed=1)
    assert third.cache_path != first.cache_path and first.cache_path.exists()
    assert _snapshot(corpus) == before


def test_touched_document_rebuilds_the_cache(corpus: Path, tmp_path: Path) -> None:
    first = load_text(corpus, tmp_path / "cache")
    doc = corpus / "doc01.txt"
    doc.write_bytes(doc.read_bytes() + b"more\n")
    second = load_text(corpus, tmp_path / "cache")
    assert second.cache_path != first.cache_path
    assert len(second.train) + len(second.val) == len(first.train) + len(first.val) + 5


def test_concurrent_builder_losing_the_race_keeps_the_winner(corpus: Path, tmp_path: Path) -> None:
    import localsgd.data.text as text

    splits = load_text(corpus, tmp_path / "cache")
    before = _snapshot(tmp_path / "cache")
    docs = text._find_documents(corpus)
    # A second worker that built the same cache concurrently renames onto the existing one.
    text._build_cache(corpus, docs, splits.cache_path, 0.1, 0, 100)
    assert _snapshot(tmp_path / "cache") == before  # no temporary folder left behind


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_by_document(corpus: Path, tmp_path: Path, seed: int) -> None:
    splits = load_text(corpus, tmp_path / "cache", val_fraction=0.2, seed=seed)
    names = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.txt"))
    assert not set(splits.train_docs) & set(splits.val_docs)
    assert sorted(splits.train_docs + splits.val_docs) == names
    assert splits.val_docs and splits.train_docs
    # Tokens are the documents' bytes, read independently, in name order.
    for docs, tokens in ((splits.train_docs, splits.train), (splits.val_docs, splits.val)):
        expected = b"".join((corpus / n).read_bytes() for n in sorted(docs))
        assert tokens.dtype == np.uint8 and tokens.tobytes() == expected
    sizes = [(corpus / n).stat().st_size for n in names]
    target = 0.2 * sum(sizes)
    assert abs(len(splits.val) - target) <= max(sizes) / 2


def test_choice_keeps_a_document_on_each_side() -> None:
    for seed in range(10):
        assert len(choose_val([10, 10], 0.99, seed)) == 1
        assert len(choose_val([10, 10, 1000], 0.001, seed)) == 1
        assert len(choose_val([5] * 10, 0.95, seed)) == 9


def test_split_depends_on_seed(corpus: Path, tmp_path: Path) -> None:
    vals = {tuple(load_text(corpus, tmp_path / "c", seed=s).val_docs) for s in range(5)}
    assert len(vals) > 1
    again = load_text(corpus, tmp_path / "other", seed=3).val_docs
    assert again == load_text(corpus, tmp_path / "c", seed=3).val_docs


def test_real_shakespeare(tmp_path: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in SHAKESPEARE.iterdir()}
    splits = load_text(SHAKESPEARE, tmp_path / "cache", val_fraction=0.1, seed=0)
    plays = sorted(p.name for p in SHAKESPEARE.glob("*.txt"))
    assert len(plays) == 42 and "SOURCES.ini" not in splits.train_docs + splits.val_docs
    assert sorted(splits.train_docs + splits.val_docs) == plays
    assert not set(splits.train_docs) & set(splits.val_docs)
    total = sum((SHAKESPEARE / n).stat().st_size for n in plays)
    assert len(splits.train) + len(splits.val) == total
    assert abs(len(splits.val) / total - 0.1) < 0.02
    val_bytes = b"".join((SHAKESPEARE / n).read_bytes() for n in splits.val_docs)
    assert splits.val.tobytes() == val_bytes
    assert splits.vocab_size == 256
    assert {p.name: p.stat().st_mtime_ns for p in SHAKESPEARE.iterdir()} == before


def test_single_file_pieces(tmp_path: Path) -> None:
    lines = [f"line {i} " + "é" * (i % 7) + "\n" for i in range(3000)]
    data = "".join(lines).encode()
    path = tmp_path / "input.txt"
    path.write_bytes(data)
    parts = split_pieces(data, 50)
    assert b"".join(parts) == data and len(parts) == 50
    assert all(p.endswith(b"\n") for p in parts)
    assert max(map(len, parts)) < 2 * len(data) / 50
    splits = load_text(path, tmp_path / "cache", val_fraction=0.1, pieces=50)
    assert len(splits.train_docs) + len(splits.val_docs) == 50
    assert all(n.startswith("input.txt#") for n in splits.train_docs + splits.val_docs)
    assert len(splits.train) + len(splits.val) == len(data)
    val_pieces = [parts[int(n.split("#")[1])] for n in splits.val_docs]
    assert splits.val.tobytes() == b"".join(sorted(val_pieces, key=parts.index))


@pytest.mark.parametrize("context, offset", [(1, 0), (7, 0), (7, 3), (16, 0), (16, 15)])
def test_windows_shift_count_and_disjoint(context: int, offset: int) -> None:
    n = 203
    tokens = np.arange(n, dtype=np.int64)  # token value = its position
    ds = TextWindows(tokens, context, offset=offset)
    # Count: whole windows of context + 1 tokens starting every `context` tokens from 0.
    assert len(ds) == sum(1 for s in range(0, n, context) if s + context + 1 <= n)
    seen: set[int] = set()
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.long and x.shape == y.shape == (context,)
        assert torch.equal(y[:-1], x[1:])
        expect = (offset + i * context + torch.arange(context + 1)) % n
        assert torch.equal(torch.cat((x, y[-1:])), expect)
        assert not seen & set(x.tolist())
        seen |= set(x.tolist())
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_set_epoch_is_deterministic_and_keeps_the_length() -> None:
    tokens = np.arange(1000, dtype=np.int64)
    a, b = TextWindows(tokens, 32), TextWindows(tokens, 32)
    offsets = set()
    for epoch in range(8):
        a.set_epoch(epoch, seed=5)
        b.set_epoch(epoch, seed=5)
        assert a.offset == b.offset and 0 <= a.offset < 32 and len(a) == 999 // 32
        assert torch.equal(a[len(a) - 1][0], b[len(b) - 1][0])
        offsets.add(a.offset)
    assert len(offsets) > 1


def test_pickled_windows_reopen_the_memmap(corpus: Path, tmp_path: Path) -> None:
    splits = load_text(corpus, tmp_path / "cache")
    ds = TextWindows(splits.train, 8, offset=5)
    blob = pickle.dumps(ds)
    assert len(blob) < 1000 < len(splits.train)  # the path travels, not the tokens
    copy = pickle.loads(blob)
    assert isinstance(copy.tokens, np.memmap) and copy.offset == 5 and len(copy) == len(ds)
    for i in (0, len(ds) // 2, len(ds) - 1):
        assert all(torch.equal(a, b) for a, b in zip(ds[i], copy[i], strict=True))
    # A plain array (or a slice of a map) is pickled as data.
    for tokens in (splits.train[100:200], splits.train[::-1]):
        part = TextWindows(tokens, 8)
        assert torch.equal(pickle.loads(pickle.dumps(part))[3][0], part[3][0])


@pytest.mark.parametrize("world", [2, 4])
def test_sampler_partitions_windows(world: int) -> None:
    tokens = np.arange(5000, dtype=np.int64)
    ds = TextWindows(tokens, 16)
    for epoch in range(3):
        ds.set_epoch(epoch, seed=1)
        taken: list[set[int]] = []
        for rank in range(world):
            sampler = ResumableDistributedSampler(ds, world, rank, seed=1, batch_size=4)
            sampler.set_epoch(epoch)
            idx = list(sampler)
            assert len(idx) == len(ds) // world
            positions = {int(t) for i in idx for t in ds[i][0]}
            assert len(positions) == 16 * len(idx)
            taken.append(positions)
        for r in range(world):
            for s in range(r + 1, world):
                assert not taken[r] & taken[s]


@pytest.mark.parametrize("world", [2, 4])
def test_mid_epoch_resume_is_bitwise(corpus: Path, tmp_path: Path, world: int) -> None:
    splits = load_text(corpus, tmp_path / "cache")
    seed, epoch, batch = 3, 1, 2
    for rank in range(world):
        ds = TextWindows(splits.train, 8)
        loader, sampler = build_train_loader(ds, batch, rank, world, seed, num_workers=0)
        ds.set_epoch(epoch, seed)
        sampler.set_epoch(epoch)
        full = list(loader)
        skip = len(full) // 2
        assert skip > 0

        ds2 = TextWindows(splits.train, 8)
        ds2.set_epoch(epoch, seed)
        loader2, _ = build_train_loader(ds2, batch, rank, world, seed, num_workers=0,
                                        start_epoch=epoch, skip_batches=skip)
        rest = list(loader2)
        assert len(rest) == len(full) - skip
        for (x1, y1), (x2, y2) in zip(full[skip:], rest, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(TextDataError) as err:
        load_text(tmp_path / "nowhere", tmp_path / "cache")
    assert str(tmp_path / "nowhere") in _one_line(err)


def test_folder_without_text(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "README.md").write_text("no text here")
    with pytest.raises(TextDataError) as err:
        load_text(root, tmp_path / "cache")
    msg = _one_line(err)
    assert "no .txt files" in msg and str(root) in msg


def test_empty_file(corpus: Path, tmp_path: Path) -> None:
    (corpus / "empty.txt").write_bytes(b"")
    with pytest.raises(TextDataError) as err:
        load_text(corpus, tmp_path / "cache")
    assert "empty.txt is empty" in _one_line(err)


@pytest.mark.parametrize(
    "content, what, offset",
    [(b"hello world\x00more", "NUL byte", 11),
     ("café ok ".encode() + b"\xff rest", "byte 0xff", 9),  # "café" is 5 bytes
     ("truncated é".encode()[:-1], "byte 0xc3", 10)],
)
def test_binary_file(corpus: Path, tmp_path: Path, content: bytes, what: str,
                     offset: int) -> None:
    (corpus / "bad.txt").write_bytes(content)
    with pytest.raises(TextDataError) as err:
        load_text(corpus, tmp_path / "cache")
    msg = _one_line(err)
    assert "bad.txt" in msg and what in msg and f"byte offset {offset}" in msg
    # Nothing half-built is left: no cache entry, no temporary folder.
    assert not list((tmp_path / "cache").iterdir())


def test_context_longer_than_split(corpus: Path, tmp_path: Path) -> None:
    splits = load_text(corpus, tmp_path / "cache")
    n = len(splits.val)
    with pytest.raises(TextDataError) as err:
        TextWindows(splits.val, n, name="val")
    msg = _one_line(err)
    assert f"context {n}" in msg and f"{n} tokens" in msg and "val split" in msg
    assert len(TextWindows(splits.val, n - 1, name="val")) == 1


def test_cache_inside_data_folder(corpus: Path) -> None:
    before = _snapshot(corpus)
    with pytest.raises(TextDataError) as err:
        load_text(corpus, corpus / "cache")
    assert "inside the data folder" in _one_line(err)
    assert _snapshot(corpus) == before and not (corpus / "cache").exists()


def test_single_document_cannot_be_split(tmp_path: Path) -> None:
    root = tmp_path / "one"
    root.mkdir()
    (root / "only.txt").write_text("just one play\n")
    with pytest.raises(TextDataError) as err:
        load_text(root, tmp_path / "cache")
    assert "single document" in _one_line(err)


def test_bad_val_fraction(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(TextDataError) as err:
        load_text(corpus, tmp_path / "cache", val_fraction=1.0)
    assert "val_fraction" in _one_line(err)

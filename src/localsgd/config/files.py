"""Reading a recipe or study file, with limits.

Every worker reads the same file, so a file that makes the reader hang or exhaust memory
hangs the whole job. A recipe is a few kilobytes; the limits below are orders of magnitude
above any real one and still refuse, in well under a second:

- files larger than ``MAX_BYTES`` (checked before reading a byte);
- documents whose aliases (``*a``) and merge keys (``<<: *a``) expand to more than
  ``MAX_NODES`` nodes (the "billion laughs" pattern: a kilobyte of nested aliases that
  expands to billions of values once OmegaConf copies it), counted on the parser's events
  before the document is composed, each re-use of an alias counting every node it names;
- nesting deeper than ``MAX_DEPTH`` (PyYAML's composer recurses once per level);
- an alias used inside the node it names (a cycle no schema can hold).

A path that is a directory, a FIFO, a socket or a device, or that cannot be read, is named
as such: opening a FIFO for reading would block until a writer appears.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from localsgd.config.errors import ConfigError

MAX_BYTES = 1 << 20
"""Largest recipe or study file read (1 MiB; real recipes are a few KiB)."""
MAX_NODES = 20_000
"""Most YAML nodes a document may expand to, every alias re-use counted in full (the
largest shipped recipe has 59; counting 20,000 takes about 0.1 s)."""
MAX_DEPTH = 100
"""Deepest nesting of mappings and lists in one document."""


class _LimitError(yaml.YAMLError):
    """A document past one of the limits; its text is the whole explanation."""


if yaml.__with_libyaml__:
    # libyaml scans and parses a megabyte in milliseconds where PyYAML's Python parser takes
    # seconds; the document is still composed in Python, where the nodes are counted.
    from yaml.cyaml import CParser as _Parser
else:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser as _Parser  # type: ignore[assignment]
    from yaml.reader import Reader
    from yaml.scanner import Scanner


class _Loader(Composer, _Parser, SafeConstructor, Resolver):  # type: ignore[misc]
    """A safe loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def __init__(self, stream: str) -> None:
        if yaml.__with_libyaml__:
            _Parser.__init__(self, stream)
        else:  # pragma: no cover
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            _Parser.__init__(self)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged in (<<: *anchor) may be overridden on purpose
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                again = key in seen
                seen.add(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, not {type(key).__name__} "
                    f"{key!r}", key_node.start_mark) from None
            if again:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping; keep one",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _read_bytes(p: Path, what: str, hint: str, example: str) -> bytes:
    """The file's bytes, or one ConfigError saying why it cannot be a recipe file."""
    fix = f"pass the path of a YAML file such as {example}"
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError([f"{what} file '{p}'{hint} does not exist; {fix}"]) from None
    except NotADirectoryError:
        raise ConfigError([f"{what} file '{p}'{hint} does not exist (a part of the path is "
                           f"a file, not a directory); {fix}"]) from None
    except PermissionError:
        raise ConfigError([f"{what} file '{p}'{hint} cannot be reached (permission denied on "
                           f"a directory of the path); {fix}"]) from None
    except OSError as exc:
        raise ConfigError([f"{what} file '{p}'{hint} cannot be read ({exc.strerror})"]) from None
    kind = _kind(st.st_mode)
    if kind is not None:
        raise ConfigError([f"{what} file '{p}'{hint} is {kind}, not a file; {fix}"])
    if st.st_size > MAX_BYTES:
        raise ConfigError([f"{what} file '{p}'{hint} is {st.st_size / 2**20:.1f} MiB; "
                           f"{what} files are limited to {MAX_BYTES // 2**20} MiB"])
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat above, opening it
        # must not wait for a writer.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise ConfigError([f"{what} file '{p}'{hint} cannot be read (permission denied); "
                           "make it readable (chmod a+r) or copy it"]) from None
    except OSError as exc:
        raise ConfigError([f"{what} file '{p}'{hint} cannot be read ({exc.strerror})"]) from None
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise ConfigError([f"{what} file '{p}'{hint} is {kind}, not a file; {fix}"])
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        reason = "it is a directory" if exc.errno == errno.EISDIR else exc.strerror
        raise ConfigError([f"{what} file '{p}'{hint} cannot be read ({reason})"]) from None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:  # grew since the stat
        raise ConfigError([f"{what} file '{p}'{hint} is over {MAX_BYTES // 2**20} MiB; "
                           f"{what} files are limited to {MAX_BYTES // 2**20} MiB"])
    return data


def _check_size(text: str) -> None:
    """Raise _LimitError if the document, its aliases expanded, is past a limit.

    Counted on the parser's events, before anything is composed (five times faster than
    counting composed nodes): each scalar and collection is one node, an alias as many as
    the node it names.
    """
    parser = _Loader(text)
    count = 0
    open_: list[tuple[int, str | None]] = []  # (count at its start, anchor) per collection
    sizes: dict[str, int] = {}  # anchor -> nodes, for finished nodes
    try:
        while parser.check_event():  # type: ignore[no-untyped-call]
            event = parser.get_event()  # type: ignore[no-untyped-call]
            if isinstance(event, yaml.ScalarEvent):
                count += 1
                if event.anchor is not None:
                    sizes[event.anchor] = 1
            elif isinstance(event, yaml.CollectionStartEvent):
                if len(open_) >= MAX_DEPTH:
                    raise _LimitError(f"nests more than {MAX_DEPTH} levels deep (at line "
                                      f"{event.start_mark.line + 1})")
                open_.append((count, event.anchor))
            elif isinstance(event, yaml.CollectionEndEvent):
                start, anchor = open_.pop()
                count += 1
                if anchor is not None:
                    sizes[anchor] = count - start
            elif isinstance(event, yaml.AliasEvent):
                if any(event.anchor == anchor for _, anchor in open_):
                    raise _LimitError(
                        f"alias *{event.anchor} at line {event.start_mark.line + 1} is used "
                        "inside the node it names (a cycle); repeat the values instead")
                count += sizes.get(event.anchor, 0)  # undefined: the composer says so
            elif isinstance(event, yaml.DocumentEndEvent):
                sizes.clear()  # anchors are per document
            if count > MAX_NODES:
                raise _LimitError(f"expands to more than {MAX_NODES} YAML nodes (aliases and "
                                  "merge keys counted at every use); write the values out "
                                  "or split the file")
    finally:
        parser.dispose()  # type: ignore[no-untyped-call]


def _parse(text: str) -> Any:
    _check_size(text)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()  # type: ignore[no-untyped-call]
        return None if node is None else loader.construct_document(node)  # type: ignore[no-untyped-call]
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]


def read_mapping(p: Path, what: str = "recipe", hint: str = "") -> dict[str, Any]:
    """A YAML file holding a mapping, or one ConfigError naming the file and the fix."""
    example = "recipes/quickstart.yaml" if what == "recipe" else "recipes/studies/*.yaml"
    data = _read_bytes(p, what, hint, example)
    try:
        loaded = _parse(data.decode("utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{what} file '{p}' is not UTF-8 text (byte {exc.start} cannot be "
                           f"decoded); pass a YAML {what} such as {example}"]) from None
    except _LimitError as exc:
        raise ConfigError([f"{what} file '{p}'{hint} {exc}"]) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{what} file '{p}' is not valid YAML{at}: {problem}"]) from None
    if not isinstance(loaded, dict):
        raise ConfigError([f"{what} file '{p}' must hold a mapping of keys to values"])
    return loaded

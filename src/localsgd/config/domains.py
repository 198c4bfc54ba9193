"""Domains of recipe keys: the values a field accepts, declared once, next to the field.

```python
batch_size: int = domain(Range(lo=1), 128)
betas: list[float] = domain(Length(2, Range(0, 1, hi_open=True)), factory=lambda: [0.9, 0.99])
```

``localsgd.config.domain_check`` walks every field of the resolved recipe (nested and
composed sections included) and reports each value outside its field's domain as one line
naming the full key, e.g. ``optim.betas[0]: must be in [0, 1), got 1.5``; ``localsgd check
--keys`` prints the same descriptions. Enum and bool fields need none (their type is the
domain, which the schema merge enforces). ``None`` passes wherever the field's type allows it
(``int | None``): the merge refuses ``null`` for the others. A domain holds one field's own
rule; rules between keys (``lr_schedule.milestones`` within ``train.epochs``) stay in the
section's checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field
from typing import Any

DOMAIN = "domain"
"""The ``dataclasses.field`` metadata key holding a field's domain."""

INT64 = 2**63
"""Integers reach torch, numpy and C libraries as 64-bit values: |n| < 2**63."""

Problem = tuple[str, str]
"""(key suffix such as '' or '[0]', message after the key)."""


def show(value: Any) -> str:
    """A value for a message: short, and safe for huge integers (``str`` refuses some)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return f"an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(v: float) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if v >= 2**31 and (v + 1) & v == 0:
        return f"2**{(v + 1).bit_length() - 1} - 1"
    return str(v)


class Domain:
    """The values one field accepts."""

    noun: str = "values"
    """What a list of these holds, for length messages ("2 numbers")."""

    def describe(self) -> str:
        raise NotImplementedError

    def problems(self, value: Any) -> list[Problem]:
        """Every way ``value`` falls outside the domain (empty when it is inside)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Range(Domain):
    """A finite number in an interval; integers also fit 64 bits."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    noun = "numbers"

    def describe(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return (f"in {'(' if self.lo_open else '['}{_number(lo)}, {_number(hi)}"
                    f"{')' if self.hi_open else ']'}")
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {_number(lo)}"
        if hi is not None:
            return f"{'<' if self.hi_open else '<='} {_number(hi)}"
        return "a finite number"

    def inside(self, v: float) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))

    def problems(self, value: Any) -> list[Problem]:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return [("", f"must be a number {self.describe()}, got {show(value)}")]
        if isinstance(value, float) and not math.isfinite(value):
            return [("", f"must be a finite number, got {value}")]
        if isinstance(value, int) and abs(value) >= INT64:
            return [("", f"must be a 64-bit integer {self.describe()}, got {show(value)}")]
        if not self.inside(value):
            return [("", f"must be {self.describe()}, got {show(value)}")]
        return []


@dataclass(frozen=True)
class Text(Domain):
    """A string: non-empty unless ``empty``, no NUL (file systems and C libraries refuse
    it), at most ``max_len`` characters, none of ``forbid``."""

    what: str = "a non-empty string"
    empty: bool = False
    max_len: int | None = None
    forbid: str = ""
    noun = "strings"

    def describe(self) -> str:
        extra = f", at most {self.max_len} characters" if self.max_len else ""
        bad = f", without {' '.join(repr(c) for c in self.forbid)}" if self.forbid else ""
        return f"{self.what}{extra}{bad}"

    def problems(self, value: Any) -> list[Problem]:
        if not isinstance(value, str):
            return [("", f"must be {self.describe()}, got {show(value)}")]
        if not value and not self.empty:
            return [("", f"must be {self.describe()}, got ''")]
        if "\x00" in value:
            return [("", f"must not contain a NUL character, got {show(value)}")]
        if self.max_len is not None and len(value) > self.max_len:
            return [("", f"must be at most {self.max_len} characters, got {len(value)}")]
        found = sorted({c for c in value if c in self.forbid})
        if found:
            return [("", f"must not contain {' '.join(repr(c) for c in found)}, got "
                         f"{show(value)}")]
        return []


@dataclass(frozen=True)
class Length(Domain):
    """A list of exactly ``n`` items, each in ``item``."""

    n: int
    item: Domain

    def describe(self) -> str:
        return f"{self.n} {self.item.noun}, each {self.item.describe()}"

    def problems(self, value: Any) -> list[Problem]:
        if not isinstance(value, list | tuple) or len(value) != self.n:
            return [("", f"must hold {self.n} {self.item.noun}, got {show(value)}")]
        return _each(self.item, value)


@dataclass(frozen=True)
class Items(Domain):
    """A list of any length (``non_empty``: at least one), each item in ``item``;
    ``increasing``: strictly increasing."""

    item: Domain
    increasing: bool = False
    non_empty: bool = False

    def describe(self) -> str:
        order = ", strictly increasing" if self.increasing else ""
        least = "a non-empty list" if self.non_empty else "a list"
        return f"{least} of {self.item.noun}, each {self.item.describe()}{order}"

    def problems(self, value: Any) -> list[Problem]:
        if not isinstance(value, list | tuple):
            return [("", f"must be {self.describe()}, got {show(value)}")]
        if self.non_empty and not value:
            return [("", f"must be {self.describe()}, got []")]
        found = _each(self.item, value)
        pairs = zip(value[:-1], value[1:], strict=True)
        if not found and self.increasing and any(a >= b for a, b in pairs):
            found.append(("", f"must be strictly increasing, got {show(list(value))}"))
        return found


@dataclass(frozen=True)
class Choice(Domain):
    """The name of a registered part; the section's check reports an unknown one, with
    the closest name, so the walker only describes it."""

    names: Callable[[], Sequence[str]] = field(compare=False)
    extra: tuple[str, ...] = ()
    key: str = ""
    """The registry's recipe key (makes equal choices compare equal)."""

    def describe(self) -> str:
        return "one of " + " | ".join([*self.extra, *self.names()])

    def problems(self, value: Any) -> list[Problem]:
        return []


def _each(item: Domain, values: Sequence[Any]) -> list[Problem]:
    return [(f"[{i}]{suffix}", msg) for i, v in enumerate(values)
            for suffix, msg in item.problems(v)]


def domain(dom: Domain, default: Any = MISSING, *,
           factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with default ``default`` (or ``factory()``) and domain ``dom``."""
    meta = {DOMAIN: dom}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


POSITIVE = Range(lo=0, lo_open=True)
"""> 0."""
AT_LEAST_ONE = Range(lo=1)
"""An integer >= 1 (a count or a period)."""
NON_NEGATIVE = Range(lo=0)
"""An integer >= 0 (0 usually: off)."""
FRACTION = Range(0, 1, hi_open=True)
"""In [0, 1): momenta, betas."""
NAME = Text(what="a non-empty string", forbid="\n")
PATH = Text(what="a non-empty path")

"""Registries of interchangeable parts, and recipe sections composed from them.

A part (a sync schedule, a reducer, an engine, ...) is a class with a ``name``, a ``Config``
dataclass holding the keys it reads, and a ``check`` that returns every problem of those
keys. A registry finds its parts by importing every module of one package, so adding a part
is adding a file: no central list names it. A section of the recipe (``sync``, ``engine``)
is composed from a few common keys plus the keys of every registered part; keys that only an
inactive part reads are reported as warnings, never as errors, so overrides compose.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Generic, TypeVar


@dataclass
class NoKeys:
    """The ``Config`` of a part that reads no keys of its own."""


@dataclass(frozen=True)
class Facts:
    """What a part's check may know beyond its own section (never another section itself)."""

    epochs: int
    """train.epochs."""
    micro_batch: int
    """data.batch_size."""
    grad_accum: int
    """train.grad_accum."""
    local_steps: bool = False
    """Whether the chosen sync schedule ever takes a step without a gradient all-reduce."""
    algorithm: str = "minibatch"
    """The chosen sync.algorithm (for messages)."""
    world_size: int | None = None
    """Known at launch only."""
    local_world_size: int | None = None
    """Workers per node (torchrun --nproc-per-node); known at launch only."""
    optimizer: str = "sgd"
    """optim.name: the inner optimizer."""
    precision: str = "fp32"
    """model.precision."""
    topology: str = "complete"
    """sync.topology: who exchanges with whom at a sync."""
    compression: str = "none"
    """sync.compression.method: what travels, at syncs and for mini-batch gradients."""
    channels_last: bool = False
    """model.channels_last."""
    compile_backend: str | None = None
    """train.compile_backend when train.compile is on, else None."""
    grad_clip: float = 0.0
    """optim.grad_clip: the global gradient norm each inner step is clipped to (0: off)."""
    replica_group: str = "1"
    """sync.replica_group: the ranks that train as one worker (1, node or S)."""
    engine: str = "ddp"
    """engine.name."""


class Part:
    """Base of every registered part: its keys, its checks and its checkpointed state."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoKeys

    @classmethod
    def check(cls, cfg: Any, facts: Facts) -> list[str]:
        """Every problem of the keys this part reads, each naming its full key."""
        return []

    @classmethod
    def provides(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        """Capabilities this part gives the parts it is combined with (from its own keys)."""
        return frozenset()

    @classmethod
    def needs(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        """Capabilities this part needs some other chosen part to give."""
        return frozenset()

    @classmethod
    def offers(cls, need: str) -> str | None:
        """How this part would give ``need`` with another value of its own keys (a phrase
        for the refusal, e.g. ``sync.exact_every > 0``), or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @classmethod
    def merge_states(cls, states: list[dict[str, Any]]) -> dict[str, Any]:
        """One state from the states of a run with another world size (one per old rank)."""
        return dict(states[0]) if states else {}

    def resume_problem(self, state: dict[str, Any], check: Any) -> str | None:
        """Why this part cannot continue from ``state``, its kind's state in a checkpoint
        (``{}`` when the part that wrote it kept none), or None when it can.

        ``check`` (``localsgd.sync.resume.ResumeCheck``) says at which step the checkpoint
        was written, whether the workers held one model then, and which keys changed. A
        part whose state is missing continues only if it can rebuild it: from the model
        (``at_consensus``) only where ``check.consensus``. The reason completes the sentence
        that names the changed keys (e.g. "resuming mid-period needs the anchor it never
        kept").
        """
        return None


P = TypeVar("P", bound=type)


class Registry(Generic[P]):
    """Parts of one kind, chosen by the recipe key ``key``; loaded from ``package``."""

    def __init__(self, key: str, package: str) -> None:
        self.key = key
        self.package = package
        self._parts: dict[str, P] = {}
        self._loaded = False

    def register(self, part: P) -> P:
        name = part.name  # type: ignore[attr-defined]
        if name in self._parts and self._parts[name] is not part:
            raise ValueError(f"{self.key}: two parts are named '{name}'")
        self._parts[name] = part
        return part

    def _load(self) -> None:
        if self._loaded:
            return
        pkg = importlib.import_module(self.package)
        for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            importlib.import_module(f"{self.package}.{mod.name}")
        self._loaded = True  # only once every file imported: a failure is raised again

    def names(self) -> list[str]:
        self._load()
        return sorted(self._parts)

    def parts(self) -> list[P]:
        return [self._parts[n] for n in self.names()]

    def find(self, name: str) -> P | None:
        self._load()
        return self._parts.get(name)

    def get(self, name: str) -> P:
        part = self.find(name)
        if part is None:
            raise KeyError(self.unknown(name))
        return part

    def unknown(self, name: str) -> str:
        choices = self.names()
        close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{self.key}: unknown value {name!r}; {hint}choose one of {', '.join(choices)}"


def _keys(config: type) -> list[tuple[str, Any, dataclasses.Field[Any]]]:
    """(name, resolved type, field) of a Config dataclass; string annotations (``from
    __future__ import annotations``) are resolved in the module that declares them."""
    hints = typing.get_type_hints(config)
    return [(f.name, hints[f.name], f) for f in fields(config)]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def compose(name: str, common: type, registries: Iterable[Registry[Any]]) -> type:
    """A dataclass with ``common``'s fields and every registered part's ``Config`` fields.

    Parts may share a key (the schedules all read ``period``) when they declare it alike
    (type, default and domain).
    """
    taken = {n: (t, _default(f), dict(f.metadata)) for n, t, f in _keys(common)}
    extra: list[tuple[str, Any, Any]] = []
    for registry in registries:
        for part in registry.parts():
            for key, hint, f in _keys(part.Config):
                if key in taken:
                    if taken[key] != (hint, _default(f), dict(f.metadata)):
                        raise TypeError(f"{registry.key}={part.name} declares '{key}' as "
                                        f"{hint} = {_default(f)!r} {dict(f.metadata)}, unlike "
                                        "another part")
                    continue
                taken[key] = (hint, _default(f), dict(f.metadata))
                kw = ({"default": f.default} if f.default is not MISSING
                      else {"default_factory": f.default_factory})
                # The metadata carries the key's domain (localsgd.config.domains).
                extra.append((key, hint, field(**kw, metadata=f.metadata)))
    cls = dataclasses.make_dataclass(name, extra, bases=(common,))
    cls.__module__ = common.__module__
    return cls


@dataclass
class Section:
    """A composed recipe section: its prefix, common keys and the registries choosing parts."""

    prefix: str
    common: type
    selectors: dict[str, Registry[Any]]
    """Common key -> the registry its value names a part of."""
    resolve: Callable[[Any, str], str] | None = None
    """(section, selector key) -> part name, for selectors with a derived value ("auto")."""
    combine: Callable[..., list[str]] | None = None
    """(section, facts, chosen parts, selectors, name_of) -> problems of the combination,
    asked once every chosen part exists."""

    def name_of(self, cfg: Any, key: str) -> str:
        return self.resolve(cfg, key) if self.resolve else str(getattr(cfg, key))

    def check(self, cfg: Any, facts: Facts) -> tuple[list[str], list[str]]:
        """(problems, warnings) of the section: unknown parts, the chosen parts' own checks,
        and one warning for every key set away from its default that no chosen part reads."""
        problems = [r.unknown(self.name_of(cfg, k)) for k, r in self.selectors.items()
                    if r.find(self.name_of(cfg, k)) is None]
        # Parts that were found still check their keys, so every problem shows at once.
        found = {k: r.find(self.name_of(cfg, k)) for k, r in self.selectors.items()}
        chosen = {k: p for k, p in found.items() if p is not None}
        used = {f.name for f in fields(self.common)}
        for part in chosen.values():
            used |= {f.name for f in fields(part.Config)}
            problems += part.check(cfg, facts)
        warnings: list[str] = []
        defaults = {f.name: _default(f) for f in fields(cfg)}
        if len(chosen) < len(found):
            # Whatever the misspelled part was meant to be: report the problems that any
            # part of its kind finds in keys the recipe sets, then stop.
            # The misspelled key itself is reported once, as unknown.
            given = {f"{self.prefix}.{n}" for n, d in defaults.items() if getattr(cfg, n) != d
                     and n not in self.selectors}
            for k, part in found.items():
                if part is None:
                    for candidate in self.selectors[k].parts():
                        problems += [m for m in candidate.check(cfg, facts)
                                     if m.split(":")[0] in given and m not in problems]
            return problems, warnings
        if self.combine is not None:
            problems += self.combine(cfg, facts, chosen, self.selectors, self.name_of)
        for f in fields(cfg):
            if f.name in used or getattr(cfg, f.name) == defaults[f.name]:
                continue
            readers: dict[str, list[str]] = {}
            for k, r in self.selectors.items():
                for p in r.parts():
                    if f.name in {g.name for g in fields(p.Config)}:
                        readers.setdefault(k, []).append(p.name)
            now = ", ".join(f"{self.prefix}.{k}={self.name_of(cfg, k)}" for k in readers)
            used_by = "; ".join(f"{self.prefix}.{k}=" + "|".join(names)
                                for k, names in readers.items())
            warnings.append(f"{self.prefix}.{f.name}: has no effect with {now} and is ignored "
                            f"(only {used_by} reads it)")
        return problems, warnings


def need(problems: list[str]) -> Callable[[bool, str], None]:
    """``check(cond, msg)`` appends ``msg`` to ``problems`` when ``cond`` is false."""

    def check(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    return check

"""What the chosen sync parts can combine into, decided in one place.

Every part declares, from its own keys and the ``Facts`` alone, which capabilities it
gives (``Part.provides``) and which it needs from the others (``Part.needs``); no part's
``check`` reads another part's keys to refuse it. A combination runs when every need of
every chosen part is given by some chosen part. Otherwise each unmet need is one line that
names the part that needs it, the parts of the kinds that could give it as the recipe
chose them, and which parts would, e.g.::

    sync.update=outer with sync.reducer=gossip: outer needs consensus (every worker holds
    the same result after a sync), which sync.reducer=compressed|mean gives

The keys of the ``sync`` section that no part owns (``sync.momentum``, ...) speak through
``common_needs``.
"""

from __future__ import annotations

from typing import Any

from localsgd.registry import Facts, Registry

MODEL_AVERAGES = "model_averages"
ALL_WORKERS = "all_workers"
NEIGHBOURS = "neighbours"
NODE_GROUPS = "node_groups"
CONSENSUS = "consensus"
LANDS_NOW = "lands_now"
WHOLE_SYNCS = "whole_syncs"
FIXED_PERIOD = "fixed_period"
RULED_PERIOD = "ruled_period"
REPLACES_STATE = "replaces_state"

MEANING = {
    MODEL_AVERAGES: "syncs that average models, with local steps between them",
    ALL_WORKERS: "one collective over every worker of a scope",
    NEIGHBOURS: "graph neighbourhoods to mix with",
    NODE_GROUPS: "a group of the workers of each node",
    CONSENSUS: "every worker holds the same result after a sync",
    LANDS_NOW: "a sync applied at the step it starts",
    WHOLE_SYNCS: "every sync applied whole, at one step",
    FIXED_PERIOD: "local periods of sync.period steps",
    RULED_PERIOD: "a single local period that a rule may set",
    REPLACES_STATE: "synced tensors replaced by their average, not corrected",
}
"""Capability -> what it means, as the refusal says it."""


def common_needs(cfg: Any, facts: Facts) -> set[str]:
    """Needs of the common ``sync`` keys (those no part owns)."""
    # None today: AdamW's averaged moments land overlapped as a correction scaled by
    # beta^tau (SyncJob._decays), which keeps a second moment positive.
    return set()


def problems(cfg: Any, facts: Facts, chosen: dict[str, Any],
             selectors: dict[str, Registry[Any]], name_of: Any) -> list[str]:
    """One line per need of a chosen part (or of the common keys) that no chosen part gives.

    ``chosen`` maps each selector key (``update``) to the part class it chose; ``name_of``
    gives the chosen name of a selector key (``auto`` resolved).
    """
    given: set[str] = set()
    for part in chosen.values():
        given |= set(part.provides(cfg, facts))
    needers: list[tuple[str, str, set[str]]] = [
        (f"sync.{key}={name_of(cfg, key)}", str(name_of(cfg, key)), set(part.needs(cfg, facts)))
        for key, part in chosen.items()]
    needers.append(("sync.momentum=average (optim.name=adamw)", "averaged AdamW state",
                    common_needs(cfg, facts)))
    out: list[str] = []
    for who, short, needs in needers:
        for need in sorted(needs - given):
            givers = {key: sorted(p.name for p in reg.parts() if need in p.provides(cfg, facts))
                      for key, reg in selectors.items()}
            givers = {k: v for k, v in givers.items() if v}
            now = ", ".join(f"sync.{k}={name_of(cfg, k)}" for k in givers
                            if f"sync.{k}={name_of(cfg, k)}" != who)
            by = " or ".join(f"sync.{k}=" + "|".join(v) for k, v in givers.items())
            offers = sorted({o for key, reg in selectors.items() for p in reg.parts()
                             if (o := p.offers(need)) is not None})
            out.append(f"{who}{' with ' + now if now else ''}: {short} needs {need} "
                       f"({MEANING.get(need, need)}), which "
                       f"{by + ' gives' if by else 'no registered part gives'}"
                       f"{''.join(', or ' + o for o in offers)}")
    from localsgd.sync.sharding import replica_problems

    return out + replica_problems(cfg, facts, chosen, selectors, name_of)

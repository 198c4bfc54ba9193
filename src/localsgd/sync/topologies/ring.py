"""Gossip on a ring: two neighbours, 1/3 each (see graphs.ring)."""

from __future__ import annotations

from localsgd.sync.parts import TOPOLOGIES
from localsgd.sync.topologies import graphs
from localsgd.sync.topologies.gossip import Gossip


@TOPOLOGIES.register
class Ring(Gossip):
    name = "ring"
    graph = staticmethod(graphs.ring)

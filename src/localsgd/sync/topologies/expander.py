"""Gossip on the paper's expander: i - 1, i + 1 and i's inverse mod K (K prime), 1/3 each."""

from __future__ import annotations

from localsgd.sync.parts import TOPOLOGIES
from localsgd.sync.topologies import graphs
from localsgd.sync.topologies.gossip import Gossip


@TOPOLOGIES.register
class Expander(Gossip):
    name = "expander"
    graph = staticmethod(graphs.expander)

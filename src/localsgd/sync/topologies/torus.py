"""Gossip on a 2-D torus: four neighbours, 1/5 each; K must split into two sides >= 3."""

from __future__ import annotations

from localsgd.sync.parts import TOPOLOGIES
from localsgd.sync.topologies import graphs
from localsgd.sync.topologies.gossip import Gossip


@TOPOLOGIES.register
class Torus(Gossip):
    name = "torus"
    graph = staticmethod(graphs.torus)

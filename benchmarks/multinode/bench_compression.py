"""Compressed against exact communication over a slow link, interleaved repeats (root only).

    sudo python benchmarks/multinode/bench_compression.py [--nodes 2 --rates 20mbit --repeats 3]

The runs of ``bench_gossip.py`` (ResNet-20, batch 64 per worker, synthetic 32x32 data, 64
steps by default, steady rate from step 16, medians over interleaved rounds), with other
variants: the no-communication bound, local SGD H=16 exact and with EF-sign deltas
(``sync.compression.method=ef_sign``), mini-batch SGD exact and with EF-sign gradients, the
paper's EF-sign SGD (local SGD with H=1 and EF-sign deltas: each step's update), and
PyTorch's PowerSGD hook (rank 1 and 2, ``benchmarks/powersgd_entry.py``) as the peer of
compressed mini-batch SGD. Reports steady steps/s, the ratio to the bound and to the exact
variant, the bytes per sync, and each node's veth bytes against the accounting. Writes
``results/compression-<stamp>.json`` and a plot.
"""

from __future__ import annotations

import sys

from bench_gossip import BOUND, main

NAMES = [BOUND, "local-H16", "local-H16-ef_sign", "minibatch", "minibatch-ef_sign",
         "local-H1-ef_sign", "powersgd-r1", "powersgd-r2"]
PAIRS = {16: ("local-H16", "local-H16-ef_sign"), 1: ("minibatch", "minibatch-ef_sign"),
         2: ("minibatch", "powersgd-r1"), 3: ("minibatch", "powersgd-r2"),
         4: ("minibatch", "local-H1-ef_sign")}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], NAMES, PAIRS, "compressed / exact", "compression", nodes=2,
                  doc=__doc__))

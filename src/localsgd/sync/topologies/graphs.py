"""Mixing matrices of the gossip topologies, as pure numpy functions of the world size K.

Each graph is a 3- or 5-regular multigraph with self-loops, and W = A / degree, where A
counts edges with multiplicity. That makes W symmetric and doubly stochastic for every K the
construction accepts, including the small K where two of a node's edges reach the same
neighbour (a ring of 2 gives the peer weight 2/3). The weights are those of the paper's code:

* ring: i is joined to i - 1, i + 1 (mod K) and itself; 1/3 each.
* torus: K = a x b with both sides >= 3, the most nearly square such split; node (r, c) is
  joined to its four grid neighbours with wrap-around and itself; 1/5 each.
* expander: K prime; i is joined to i - 1, i + 1 (mod K) and to its inverse mod K (0 to
  itself); 1/3 each. The inverse map is an involution, so the graph is undirected.

Without training, gossip contracts the distance to the average by the second largest
eigenvalue modulus of W each step (``contraction``).
"""

from __future__ import annotations

import math

import numpy as np


class GraphError(ValueError):
    """A world size the chosen construction cannot build."""


def _shift(k: int, by: int) -> np.ndarray:
    return np.roll(np.eye(k), by, axis=1)


def ring(k: int) -> np.ndarray:
    if k < 1:
        raise GraphError(f"a ring needs at least 1 worker, got {k}")
    return (np.eye(k) + _shift(k, 1) + _shift(k, -1)) / 3.0


def torus_sides(k: int) -> tuple[int, int] | None:
    """(rows, columns) with rows <= columns, both >= 3, rows * columns = k; rows as close to
    sqrt(k) as possible. None if there is no such split."""
    for rows in range(math.isqrt(k), 2, -1):
        if k % rows == 0 and k // rows >= 3:
            return rows, k // rows
    return None


def torus(k: int) -> np.ndarray:
    sides = torus_sides(k)
    if sides is None:
        raise GraphError(f"a torus needs a world size that is a product of two sides >= 3 "
                         f"(9, 12, 15, 16, 18, 20, ...), got {k}")
    rows, cols = sides
    w = np.eye(k)
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                w[i, (rr % rows) * cols + cc % cols] += 1.0
    return w / 5.0


def is_prime(k: int) -> bool:
    return k >= 2 and all(k % d for d in range(2, math.isqrt(k) + 1))


def expander(k: int) -> np.ndarray:
    if not is_prime(k):
        raise GraphError(f"an expander joins each worker to its inverse modulo the world "
                         f"size, which needs a prime world size (2, 3, 5, 7, 11, 13, ...), "
                         f"got {k}")
    a = _shift(k, 1) + _shift(k, -1)
    a[0, 0] += 1.0
    for i in range(1, k):
        a[i, pow(i, -1, k)] += 1.0
    return a / 3.0


def contraction(w: np.ndarray) -> float:
    """The second largest eigenvalue modulus of symmetric doubly stochastic ``w``: the
    factor by which one gossip step shrinks the distance to the average (at worst)."""
    eig = np.sort(np.abs(np.linalg.eigvalsh(w)))[::-1]
    return float(eig[1]) if len(eig) > 1 else 0.0

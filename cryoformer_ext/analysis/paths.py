"""Paths through latent space: a straight line, and a path that stays on the data.

A straight line between two states can cross regions no particle occupies (a curved or branched latent
distribution), and the maps decoded there are extrapolations the model never had to fit. cryoDRGN's
``graph_traversal`` avoids that by walking from particle to particle along a nearest-neighbour graph;
:func:`graph_path` does the same, with the same graph rule so that paths agree with cryoDRGN's:

* every particle is linked to its ``max_neighbors`` nearest latents (Euclidean), directed edges;
* of all those links only the shortest ``N * avg_neighbors`` are kept (one global distance cut-off),
  so dense regions stay connected and long jumps across empty space are dropped;
* Dijkstra's shortest path from the first to the second particle on that graph.

Every point of such a path is the latent of a real particle.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

DEFAULT_MAX_NEIGHBORS = 10  # cryoDRGN graph_traversal's defaults
DEFAULT_AVG_NEIGHBORS = 5.0


class NoPathError(ValueError):
    """The two particles are in different connected parts of the neighbour graph."""


class GraphPath(BaseModel):
    """A shortest path on the neighbour graph: particle indices (0-based, input order) from start to end."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    particles: list[int]
    length: float          # sum of the Euclidean steps along the path
    euclidean: float       # straight-line distance between the two ends
    max_edge: float        # the global distance cut-off of the graph
    max_neighbors: int
    avg_neighbors: float


def straight_line(z_start: np.ndarray, z_end: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` latents evenly spaced from ``z_start`` to ``z_end`` (both included), shape (steps, zdim)."""
    if steps < 2:
        raise ValueError(f"a path needs at least 2 steps, got {steps}")
    a = np.asarray(z_start, dtype=np.float64).ravel()
    b = np.asarray(z_end, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"end points have different dimensions: {a.shape} and {b.shape}")
    t = np.linspace(0.0, 1.0, steps)[:, None]
    return ((1.0 - t) * a + t * b).astype(np.float32)


def _knn(latents: np.ndarray, max_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.neighbors import NearestNeighbors

    z = np.asarray(latents, dtype=np.float64)
    if z.ndim != 2 or len(z) < 2:
        raise ValueError(f"need latents of shape (N >= 2, zdim), got {z.shape}")
    if max_neighbors < 2:
        raise ValueError(f"need max_neighbors >= 2, got {max_neighbors}")
    return NearestNeighbors(n_neighbors=min(max_neighbors, len(z))).fit(z).kneighbors(z)


def _graph(dist: np.ndarray, idx: np.ndarray, cutoff: float):
    from scipy.sparse import csr_matrix

    n, k = dist.shape
    rows = np.repeat(np.arange(n), k)
    cols, d = idx.ravel(), dist.ravel()
    sel = (d < cutoff) & (rows != cols)
    # a zero-length link (two identical latents) must stay an edge: sparse matrices drop explicit zeros
    lengths = np.maximum(d[sel], np.finfo(np.float64).tiny)
    return csr_matrix((lengths, (rows[sel], cols[sel])), shape=(n, n))


def _cutoff(dist: np.ndarray, avg_neighbors: float) -> float:
    if avg_neighbors <= 0:
        raise ValueError(f"need avg_neighbors > 0, got {avg_neighbors}")
    keep_n = min(max(int(len(dist) * avg_neighbors + 1e-9), 1), dist.size)
    return float(np.partition(dist.ravel(), keep_n - 1)[keep_n - 1])


def neighbour_graph(latents: np.ndarray, max_neighbors: int = DEFAULT_MAX_NEIGHBORS,
                    avg_neighbors: float = DEFAULT_AVG_NEIGHBORS):
    """The directed neighbour graph as a ``scipy.sparse`` CSR matrix of edge lengths, and its cut-off.

    A particle counts as its own first neighbour when the ``N * avg_neighbors`` shortest links are
    chosen (as in cryoDRGN), but self-links carry no edge.
    """
    dist, idx = _knn(latents, max_neighbors)
    cutoff = _cutoff(dist, avg_neighbors)
    return _graph(dist, idx, cutoff), cutoff


def _reaches(graph, start: int, end: int) -> bool:
    from scipy.sparse.csgraph import breadth_first_order

    return end in set(breadth_first_order(graph, start, directed=True, return_predecessors=False).tolist())


def needed_avg_neighbors(latents: np.ndarray, start: int, end: int, max_neighbors: int) -> float | None:
    """The smallest ``avg_neighbors`` whose graph connects ``start`` to ``end`` (None: no value does;
    more ``max_neighbors`` are needed). Bisection over the sorted link lengths (connectivity only grows)."""
    dist, idx = _knn(latents, max_neighbors)
    ordered = np.sort(dist.ravel())
    if not _reaches(_graph(dist, idx, np.inf), start, end):
        return None
    lo, hi = 0, len(ordered)  # keep the lo+1 .. hi shortest links; hi: all of them (cut-off infinite)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _reaches(_graph(dist, idx, float(ordered[mid])), start, end):
            hi = mid
        else:
            lo = mid
    n = len(dist)
    return float(np.ceil(100.0 * (hi + 1) / n) / 100.0)  # int(n * avg) >= hi + 1


def graph_path(latents: np.ndarray, start: int, end: int, *, max_neighbors: int = DEFAULT_MAX_NEIGHBORS,
               avg_neighbors: float = DEFAULT_AVG_NEIGHBORS) -> GraphPath:
    """Shortest path from particle ``start`` to particle ``end`` along the neighbour graph.

    Raises :class:`NoPathError` when the graph does not connect them; its message says which
    ``avg_neighbors`` would (or that ``max_neighbors`` must grow).
    """
    from scipy.sparse.csgraph import dijkstra

    z = np.asarray(latents, dtype=np.float64)
    for name, i in (("start", start), ("end", end)):
        if not 0 <= int(i) < len(z):
            raise ValueError(f"{name} particle {i} is out of range (0..{len(z) - 1})")
    graph, cutoff = neighbour_graph(z, max_neighbors, avg_neighbors)
    dist, pred = dijkstra(graph, directed=True, indices=int(start), return_predecessors=True)
    if not np.isfinite(dist[int(end)]):
        need = needed_avg_neighbors(z, int(start), int(end), max_neighbors)
        hint = (f"--avg-neighbors {need:g} connects them" if need is not None else
                f"even all {max_neighbors} nearest neighbours of each particle do not connect them: raise --max-neighbors")
        raise NoPathError(f"no path from particle {start} to particle {end} in the nearest-neighbour graph "
                          f"(max_neighbors={max_neighbors}, avg_neighbors={avg_neighbors:g}, links shorter than "
                          f"{cutoff:.4g}); {hint}")
    path = [int(end)]
    while path[-1] != int(start):
        path.append(int(pred[path[-1]]))
    path.reverse()
    steps = np.linalg.norm(np.diff(z[path], axis=0), axis=1)
    return GraphPath(particles=path, length=float(steps.sum()), euclidean=float(np.linalg.norm(z[end] - z[start])),
                     max_edge=cutoff, max_neighbors=max_neighbors, avg_neighbors=float(avg_neighbors))


def resample_path(latents: np.ndarray, particles: list[int], steps: int | None) -> list[int]:
    """At most ``steps`` particles of a path, evenly spaced by path length (ends kept, no repeats).

    ``steps`` None keeps every particle. Picking path particles, not interpolating between them, keeps
    every map on the data.
    """
    if steps is None or steps >= len(particles):
        return list(particles)
    if steps < 2:
        raise ValueError(f"a path needs at least 2 steps, got {steps}")
    z = np.asarray(latents, dtype=np.float64)[particles]
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(z, axis=0), axis=1))])
    targets = np.linspace(0.0, arc[-1], steps)
    picked = np.unique(np.abs(arc[None, :] - targets[:, None]).argmin(axis=1))  # nearest node to each target
    return [particles[int(i)] for i in picked]

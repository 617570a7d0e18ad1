"""Channel atoms and their union-find.

Every prunable dimension of every parameter gets one integer *atom* per index. Activations carry, per
dimension, either ``None`` (batch, spatial, sequence, data: a dimension with no channel identity) or an
int64 array giving, for each index of that dimension, the atom it belongs to (an index may repeat an atom:
``flatten`` of a ``(C, H, W)`` map gives each channel ``H*W`` consecutive features). Op rules record that
atoms are the same channel (edges); the classes of the resulting equivalence relation are the units that
pruning removes. Edges are only collected during tracing and solved once, vectorised, at the end: this keeps
a trace at the cost of one forward pass.
"""

from __future__ import annotations

import numpy as np

Atoms = np.ndarray  # int64, shape (dim_size,)


class AtomStore:
    """Allocates atoms, collects equalities between them and the reasons that freeze some of them."""

    def __init__(self) -> None:
        self.n = 0
        self._a: list[np.ndarray] = []
        self._b: list[np.ndarray] = []
        self.frozen: list[tuple[np.ndarray, str]] = []

    def new(self, k: int) -> Atoms:
        """``k`` fresh atoms, shape ``(k,)``."""
        arr = np.arange(self.n, self.n + k, dtype=np.int64)
        self.n += k
        return arr

    def union(self, a: Atoms, b: Atoms) -> None:
        """Declare ``a[i]`` and ``b[i]`` the same channel for every ``i`` (equal lengths or length 1)."""
        if a is b:
            return
        if a.shape != b.shape:
            a, b = np.broadcast_arrays(a, b)
        self._a.append(a.ravel())
        self._b.append(b.ravel())

    def union_rows(self, mat: np.ndarray) -> None:
        """Merge all atoms of each row of ``mat`` (shape ``(rows, k)``) into one unit per row."""
        if mat.shape[1] > 1:
            self.union(np.repeat(mat[:, :1], mat.shape[1] - 1, axis=1), mat[:, 1:])

    def freeze(self, a: Atoms, reason: str) -> None:
        """Mark the channels of ``a`` as not prunable, with a reason shown to the user."""
        self.frozen.append((np.asarray(a).ravel(), reason))

    def solve(self) -> np.ndarray:
        """Class label of every atom, shape ``(n,)``: equal labels = same channel. The label of a class is its
        smallest atom (so labels are < ``n`` and sort classes by their first atom)."""
        if not self._a:
            return np.arange(self.n, dtype=np.int64)
        return connected_labels(self.n, np.concatenate(self._a), np.concatenate(self._b))


def connected_labels(n: int, a: np.ndarray, b: np.ndarray, max_rounds: int = 48) -> np.ndarray:
    """Connected components of the graph on ``n`` nodes with edges ``a[i] -- b[i]``: the label of every
    node is the smallest node of its component.

    A vectorised union-find (hook the larger root of each edge under the smaller, then pointer-jump until
    every tree is a star) finishes in a few rounds on dependency graphs, faster than building a sparse
    matrix; an adversarial graph that needs more than ``max_rounds`` rounds is finished by scipy's
    ``connected_components`` when available.
    """
    dtype = np.int32 if n < 2**31 - 1 else np.int64  # half the memory traffic on every pass
    parent = np.arange(n, dtype=dtype)
    a = np.asarray(a).astype(dtype, copy=False)
    b = np.asarray(b).astype(dtype, copy=False)
    keep = a != b  # first round: every atom is its own root
    a, b = a[keep], b[keep]
    pa, pb = a, b
    for r in range(max_rounds):
        if r:
            pa, pb = parent[a], parent[b]
            diff = pa != pb
            a, b, pa, pb = a[diff], b[diff], pa[diff], pb[diff]
        if not a.size:
            return parent.astype(np.int64, copy=False)
        np.minimum.at(parent, np.maximum(pa, pb), np.minimum(pa, pb))
        while True:  # pointer jumping until every atom points at a root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    try:
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import connected_components
    except ImportError:  # keep hooking: each round removes at least one root, so this ends
        every = np.arange(n, dtype=parent.dtype)  # the forest so far (atom -- its root) and what is left
        a, b = np.concatenate([every, parent[a]]), np.concatenate([parent, parent[b]])
        return connected_labels(n, a, b, max_rounds=1 << 62)
    parent = parent.astype(np.int64, copy=False)
    a, b = parent[a.astype(np.int64)], parent[b.astype(np.int64)]
    adj = csr_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
    _, comp = connected_components(adj, directed=True, connection="weak")
    comp = comp.astype(np.int64)
    # scipy numbers components in order of their smallest node: that node is each label's first occurrence
    _, first = np.unique(comp, return_index=True)
    return first[comp[parent]]

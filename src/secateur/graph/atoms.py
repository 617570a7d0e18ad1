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
        """Class label of every atom, shape ``(n,)``: equal labels = same channel; labels are < ``n``."""
        parent = np.arange(self.n, dtype=np.int64)
        if not self._a:
            return parent
        a = np.concatenate(self._a)
        b = np.concatenate(self._b)
        try:  # scipy's connected components when available (C speed), else a vectorised union-find
            from scipy.sparse import csr_matrix
            from scipy.sparse.csgraph import connected_components
        except ImportError:
            pass
        else:
            adj = csr_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(self.n, self.n))
            _, comp = connected_components(adj, directed=True, connection="weak")
            return comp.astype(np.int64)  # component index: any consistent label < n will do
        while True:
            pa, pb = parent[a], parent[b]
            diff = pa != pb
            if not diff.any():
                return parent
            a, b, pa, pb = a[diff], b[diff], pa[diff], pb[diff]
            lo = np.minimum(pa, pb)
            hi = np.maximum(pa, pb)
            np.minimum.at(parent, hi, lo)
            while True:  # pointer jumping until every atom points at a root
                nxt = parent[parent]
                if np.array_equal(nxt, parent):
                    break
                parent = nxt

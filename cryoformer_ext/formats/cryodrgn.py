"""cryoDRGN's two pickle formats, so its tools run on cryoFormer's latents and selections.

* ``z.pkl``: the latent of every particle, a pickled ``(N, zdim)`` float32 numpy array in input order
  (what ``cryodrgn train_vae`` writes as ``z.<epoch>.pkl``; read by ``cryodrgn graph_traversal``,
  ``pc_traversal``, ``direct_traversal`` and the analysis notebooks).
* ``ind.pkl``: a pickled int64 numpy array of 0-based particle indices (``--ind`` of cryoDRGN's
  commands, written by ``cryodrgn filter``).

Both are plain ``pickle.dump`` of a numpy array, as cryoDRGN's ``utils.save_pkl`` does; the pickle only
references numpy's array reconstructors, nothing of this package.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from cryoformer_ext.formats.atomic import atomic_write_bytes


def write_z_pkl(path: str | os.PathLike, latents: np.ndarray) -> Path:
    z = np.ascontiguousarray(latents, dtype=np.float32)
    if z.ndim != 2:
        raise ValueError(f"latents must be (N, zdim), got shape {z.shape}")
    return atomic_write_bytes(path, pickle.dumps(z, protocol=4))


def write_ind_pkl(path: str | os.PathLike, indices: np.ndarray) -> Path:
    ind = np.ascontiguousarray(indices, dtype=np.int64).ravel()
    return atomic_write_bytes(path, pickle.dumps(ind, protocol=4))

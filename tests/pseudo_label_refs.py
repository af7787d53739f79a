"""NumPy references and data shared by the self-training pseudo-label tests.

Explicit loops, float32 as in CRST: the oracles `test_thresholds`,
`test_densify` and `test_easy_hard` compare the JAX kernels against.
"""

import numpy as np

from jaxda.types import IGNORE_LABEL as IGNORE


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def blocky_probs(seed, b, h, w, c, block=4, scale=3.0, noise=0.8):
  """Piecewise-constant 'scenes' plus noise: voting has regions to fill."""
  rng = np.random.default_rng(seed)
  blocks = rng.normal(size=(b, -(-h // block), -(-w // block), c)) * scale
  logits = np.repeat(np.repeat(blocks, block, 1), block, 2)[:, :h, :w]
  return np_softmax(logits + rng.normal(size=(b, h, w, c)) * noise)


def np_select(probs, thr, inclusive=True):
  """CRST label_selection in float32, explicit loop over pixels."""
  p = np.asarray(probs, np.float32).reshape(-1, probs.shape[-1])
  lam = np.asarray(thr, np.float32)
  out = np.full(p.shape[0], IGNORE, np.int64)
  for i in range(p.shape[0]):
    r = p[i] / lam
    best = 0
    for k in range(1, len(r)):
      if r[k] > r[best]:
        best = k
    if r[best] > 1 or (inclusive and r[best] == 1):
      out[i] = best
  return out.reshape(probs.shape[:-1])

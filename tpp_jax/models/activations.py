"""Activations shared by the models."""
from __future__ import annotations

import jax
import numpy as np


def gelu(x):
  """Exact GELU as PyTorch computes it, x/2 * (1 + erf(x/sqrt(2))).

  Same function as flax's nn.gelu(approximate=False), which goes through erfc: on XLA:CPU erf is a cheap
  rational polynomial while erfc evaluates exp, and the erfc form cost ~10% of the demo LoRA step.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(0.7071067811865476, x.dtype)))

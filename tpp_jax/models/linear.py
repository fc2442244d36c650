"""Dense layers over tokens, written as one 2-D matmul (rows = every leading dim, e.g. images x tokens).

Why: a Dense layer applied to (images, tokens, d) arrays contracts the last dim; its kernel gradient then contracts
two dims, (images, tokens), of the input and of the output gradient. XLA:CPU canonicalises that dot with a layout
copy of the output gradient, and where that gradient is the residual stream's (attention out-projection, fc2, an
adapter's up-projection) it fuses the whole chain of residual-gradient additions of the later blocks into the copy,
once per block: the backward grows quadratically with depth. Flattened to (rows, d) first, the kernel gradient is a
plain 2-D matmul contracting one dim, as in PyTorch's F.linear; on GPU / TPU the reshape is free (a layout no-op).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax


def token_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """jax.lax.dot_general; a Dense layer's form (last dim of lhs with dim 0 of a 2-D rhs) as a 2-D matmul."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (lhs.ndim > 2 and rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
      and not lhs_batch and not rhs_batch):
    y = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=preferred_element_type)
    return y.reshape(*lhs.shape[:-1], rhs.shape[-1])
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


def token_matmul(x, w):
  """x (..., d_in) @ w (d_in, d_out) as one 2-D matmul over all leading dims of x."""
  return token_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


Dense = functools.partial(nn.Dense, dot_general=token_dot_general)
"""flax.linen.Dense (same params, same outputs) computing through token_dot_general."""

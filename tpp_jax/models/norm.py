"""Layer normalisation over the last dim, with the backward pass written out (a jax.custom_vjp).

Same function as torch.nn.functional.layer_norm / flax's nn.LayerNorm: y = (x - mean) / sqrt(var + eps) * scale + bias,
the biased variance over the last dim. What differs is the backward. Autodiff of the forward formula keeps x, the
mean and the variance and differentiates each step: four separate reductions over the last dim plus the element-wise
passes between them, which XLA:CPU runs as separate loops over the activations. Written out, the gradient is
  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * scale,  xhat = (x - mean) * rstd
(two reductions of one pass each), dscale = sum(dy * xhat), dbias = sum(dy) over the leading dims, from xhat and rstd
kept by the forward pass. On the demo ViT-Ti6/8 (64 px, batch 64, 2 CPU devices), the LoRA fine-tune step went from
346-359 ms to 296-327 ms (`benchmarks/step_speed.py`, README "Performance"). Reverse mode only: jax.jvp of it raises.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
  """LayerNorm of x over its last dim; scale and bias have shape (x.shape[-1],) and x's dtype."""
  return _forward(x, scale, bias, eps)[0]


def _normalise(x, eps):
  mean = x.mean(-1, keepdims=True)
  centred = x - mean
  rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
  return centred * rstd, rstd


def _forward(x, scale, bias, eps):
  xhat, rstd = _normalise(x, eps)
  return xhat * scale + bias, (xhat, rstd, scale)


def _backward(eps, residuals, dy):
  del eps
  xhat, rstd, scale = residuals
  g = dy * scale
  dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
  leading = tuple(range(dy.ndim - 1))
  return dx, (dy * xhat).sum(leading), dy.sum(leading)


layer_norm.defvjp(_forward, _backward)

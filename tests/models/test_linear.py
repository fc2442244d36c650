"""tpp_jax.models.linear: the 2-D token matmul equals jax.lax.dot_general / flax's Dense, gradients included, and its
kernel gradient contracts one dim (the form that keeps XLA:CPU from fusing the residual-gradient chain per block)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from tpp_jax.models import linear
from tpp_jax.models.peft import Adapter


def _contracting_dims(jaxpr):
  """The lhs contracting dims of every dot_general in a (closed) jaxpr, sub-jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(tuple(eqn.params["dimension_numbers"][0][0]))
    for sub in jax_core.jaxprs_in_params(eqn.params):
      out += _contracting_dims(sub)
  return out


def test_dense_equals_flax_dense_values_and_grads():
  x = jax.random.normal(jax.random.key(0), (3, 5, 7))
  ours, ref = linear.Dense(4, name="d"), nn.Dense(4, name="d")
  params = ref.init(jax.random.key(1), x)
  assert jax.tree_util.tree_structure(ours.init(jax.random.key(1), x)) == jax.tree_util.tree_structure(params)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-6, atol=1e-6)
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_token_dot_general_other_forms_unchanged():
  a, b = jax.random.normal(jax.random.key(0), (2, 3, 4)), jax.random.normal(jax.random.key(1), (2, 4, 5))
  dims = (((2,), (1,)), ((0,), (0,)))  # a batched matmul: not the Dense form, passed through
  np.testing.assert_allclose(linear.token_dot_general(a, b, dims), jax.lax.dot_general(a, b, dims), rtol=1e-6)
  w = jax.random.normal(jax.random.key(2), (4, 6))
  np.testing.assert_allclose(linear.token_matmul(a, w), a @ w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(linear.token_matmul(a[0], w), a[0] @ w, rtol=1e-6)


def test_adapter_kernel_gradients_contract_one_dim():
  """The adapter's weight gradients are 2-D matmuls; through flax's own Dense they contract (images, tokens)."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 16))
  module = Adapter(4)
  params = module.init(jax.random.key(1), x)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2)))(params)
  dims = _contracting_dims(jaxpr.jaxpr)
  assert dims and all(len(d) == 1 for d in dims), dims
  ref = nn.Dense(4)  # the control: flax's Dense on the same 3-D input contracts two dims for its kernel gradient
  p_ref = ref.init(jax.random.key(1), x)
  ref_dims = _contracting_dims(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(ref.apply(p, x) ** 2)))(p_ref).jaxpr)
  assert any(len(d) == 2 for d in ref_dims), ref_dims

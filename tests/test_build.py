"""tpp_jax.build: the learning-rate schedule (against optax's own) is an argument of the compiled train step, so runs
that differ only in steps / lr / warm-up compile one and the same program."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tpp_jax import build as build_lib

from conftest import load_config


@pytest.mark.parametrize("steps,warmup,lr,ratio", [(200, 20, 1e-3, 0.01), (6, 20, 3e-3, 0.0), (50, 0, 5e-4, 0.1),
                                                   (1, 5, 1e-2, 0.01)])
def test_the_schedule_is_optaxs_warmup_cosine_decay(steps, warmup, lr, ratio):
  c = load_config("experiment", "demo,smoke")
  c.steps = steps
  c.optim.update(lr=lr, warmup_steps=warmup, min_lr_ratio=ratio)
  w = min(warmup, max(steps - 1, 0))
  reference = optax.warmup_cosine_decay_schedule(0.0, lr, w, max(steps, w + 1), end_value=lr * ratio)
  ours = build_lib.lr_schedule(build_lib.lr_hyper(c))
  counts = np.arange(0, steps + 3)
  np.testing.assert_allclose([float(ours(k)) for k in counts], [float(reference(k)) for k in counts],
                             rtol=2e-6, atol=lr * 1e-6)


def test_runs_that_differ_in_steps_and_lr_compile_the_same_train_step():
  def lowered(arg):
    built = build_lib.build(load_config("experiment", arg))
    state = built.state  # abstract (ShapeDtypeStruct leaves)
    batch = {k: v for k, v in build_lib.dummy_batch(built.config, n=16).items() if k in ("image", "label")}
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    hyper = jax.ShapeDtypeStruct((4,), jnp.float32)
    return built.train_step.compiled.lower(state, batch, jax.random.key(0), hyper).as_text()

  base = lowered("demo,smoke,px32")
  assert lowered("demo,smoke,px32,steps=37,optim.lr=3e-4,optim.warmup_steps=3,optim.min_lr_ratio=0.2") == base
  assert lowered("demo,smoke,px32,optim.weight_decay=0.01") != base  # a number the step does hold

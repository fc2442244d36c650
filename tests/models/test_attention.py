"""tpp_jax/models/attention.py: 'auto' (XLA's attention off GPU) and the padded (even-length) call against torch's
SDPA, and the once-per-shape check that guards cuDNN's padded attention on GPU."""
import jax
import jax.numpy as jnp
import pytest

from tpp_jax.models import attention as attention_lib

from conftest import check_attention_against_torch


def check_against_torch(fn, t, seed):
  check_attention_against_torch(fn, (3, t, 4, 16), seed)


@pytest.mark.parametrize("t", [18, 65])  # MAE's visible tokens, the demo's full sequence
def test_auto_attention_on_cpu_values_and_gradients_match_torch_sdpa(t):
  check_against_torch(lambda q, k, v: attention_lib.attention(q, k, v, "auto"), t, seed=t)


@pytest.mark.parametrize("t", [17, 197])  # odd: padded by one hidden token (ViT-B/16 at 224 px has 197)
def test_padded_attention_values_and_gradients_match_torch_sdpa(t):
  """The padding, the key/value length mask and the dropped row change nothing (through XLA's implementation: the
  same call cuDNN gets on GPU)."""
  check_against_torch(lambda q, k, v: attention_lib.padded_attention(q, k, v, "xla"), t, seed=t)


def test_padded_check_runs_eagerly_inside_a_trace_and_names_a_failure():
  """The check compiles and runs its own small computation even while a step is being traced, adding nothing to the
  step's graph; a failing implementation comes back as a reason (the 'auto' path then uses XLA's attention)."""
  check = attention_lib.padded_check.__wrapped__  # uncached
  seen = []

  def step(x):
    seen.append(check("xla", 17, 2, 8, "float32"))
    return x * 2

  jaxpr = jax.make_jaxpr(step)(jnp.ones(3))
  assert seen == [None] and len(jaxpr.eqns) == 1, (seen, jaxpr)
  assert check("xla", 17, 2, 8, "bfloat16") is None  # within bf16 rounding
  reason = check("no-such-kernel", 17, 2, 8, "float32")
  assert reason is not None and "no-such-kernel" in reason, reason


def test_auto_on_cpu_never_runs_the_check(monkeypatch):
  monkeypatch.setattr(attention_lib, "padded_check", lambda *a: pytest.fail("checked on CPU"))
  q = jnp.ones((1, 5, 2, 8), jnp.bfloat16)
  assert attention_lib.attention(q, q, q, "auto").shape == q.shape


def test_auto_on_gpu_pads_for_cudnn_when_the_check_passes_else_warns_and_uses_xla(monkeypatch, caplog):
  """The GPU decision, with the backend and cuDNN stood in for (this machine has no GPU)."""
  calls = []
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attention_lib, "padded_attention", lambda q, k, v, impl: calls.append(impl) or q)
  q = jnp.ones((1, 197, 2, 8), jnp.bfloat16)
  monkeypatch.setattr(attention_lib, "padded_check", lambda *a: None)
  attention_lib.attention(q, q, q, "auto")
  assert calls == ["cudnn"]
  monkeypatch.setattr(attention_lib, "padded_check", lambda *a: "XlaRuntimeError: no cuDNN graph")
  with caplog.at_level("WARNING"):
    out = attention_lib.attention(q, q, q, "auto")
  assert calls == ["cudnn"] and out.shape == q.shape  # XLA's attention ran
  assert "197 tokens (padded to 198) failed its check (XlaRuntimeError: no cuDNN graph)" in caplog.text
  q32 = q.astype(jnp.float32)
  attention_lib.attention(q32, q32, q32, "auto")  # fp32 on GPU: XLA's, no check
  assert calls == ["cudnn"]

"""`host_call`: NumPy inside jit, on XLA's buffers where jax has `buffer_callback`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import host_call


def _row_sums(outputs, x):
  np.sum(x, axis=-1, out=outputs[0])
  outputs[1][...] = x.shape[-1]


@pytest.mark.parametrize("in_place", [True, False])
def test_results_with_and_without_buffer_callback(in_place, monkeypatch):
  if not in_place:
    monkeypatch.setattr(host_call, "buffer_callback", None)  # pure_callback's copies.
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  results = [jax.ShapeDtypeStruct((3,), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)]
  sums, m = jax.jit(lambda a: host_call.host_call(_row_sums, results, a))(x)
  np.testing.assert_array_equal(sums, [6, 22, 38])
  assert m == 4 and sums.dtype == jnp.float32
  batched = jax.jit(jax.vmap(lambda a: host_call.host_call(_row_sums, results, a)[0]))
  np.testing.assert_array_equal(batched(np.stack([x, 2 * x])), [[6, 22, 38], [12, 44, 76]])


def test_operands_are_read_in_place():
  if host_call.buffer_callback is None:
    pytest.skip("This jax has no buffer_callback: host_call copies.")
  x = jnp.arange(1 << 16, dtype=jnp.float32)
  seen = []

  def fill(outputs, a):
    seen.append(a.ctypes.data)
    outputs[0][...] = a[-1]

  result = jax.ShapeDtypeStruct((), jnp.float32)
  out = jax.jit(lambda a: host_call.host_call(fill, [result], a))(x)[0]
  assert out == (1 << 16) - 1
  assert seen == [x.unsafe_buffer_pointer()]  # XLA's buffer itself, not a copy.


def test_lowering_for_cpu_traces_the_cpu_branch_alone():
  traced = []

  def make():  # A new function each time: jax caches traces per function, not per context.
    def f(x):
      cpu = lambda a: traced.append("cpu") or a + 1  # noqa: E731
      return host_call.on_cpu_or(x, cpu=cpu, default=lambda a: traced.append("dev") or jnp.sin(a))

    return f

  x = jnp.arange(3.0)
  assert "platform_index" in str(jax.make_jaxpr(make())(x)) and sorted(traced) == ["cpu", "dev"]
  traced.clear()
  with host_call.lowering_for_cpu():
    assert "platform_index" not in str(jax.make_jaxpr(make())(x)) and traced == ["cpu"]
    np.testing.assert_array_equal(jax.jit(make())(x), x + 1)
  assert "platform_index" in str(jax.make_jaxpr(make())(x))  # The state is restored after.

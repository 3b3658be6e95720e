"""attn.xla.jit: jax.jit with the project's XLA:CPU options, same results."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from attn import xla


def projection_log_softmax(x, w, *, scale):
    return jax.nn.log_softmax(scale * x @ w.T)  # the beam search's vocabulary step


def test_jit_gives_jax_jits_results_with_static_arguments():
    keys = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(keys[0], (16, 32)), jax.random.normal(keys[1], (300, 32))
    ours = xla.jit(projection_log_softmax, static_argnames=('scale',))
    want = jax.jit(projection_log_softmax, static_argnames=('scale',))(x, w, scale=0.5)
    np.testing.assert_allclose(ours(x, w, scale=0.5), want, rtol=1e-6, atol=1e-6)
    assert ours(x, w, scale=2.0).shape == (16, 300)  # a new static value compiles anew


def ynn_bodies(hlo: str) -> list[str]:
    """The fused computations that XLA:CPU hands to its YNNPACK library."""
    names = re.findall(r'calls=(%[\w.]+),[^\n]*"__ynn_fusion"', hlo)
    return [re.search(re.escape(name) + r' [^\n]*\n(.*?)\n}', hlo, re.S).group(1) for name in names]


def test_on_this_cpu_no_library_fusion_takes_a_reduction(jit=xla.jit):
    """Where the options apply, the vocabulary's max and sum run outside the dot's YNN
    fusion (fused, the pair ran ~3x slower than the dot alone)."""
    x, w = jnp.ones((128, 512)), jnp.ones((32000, 512))
    compiled = jit(projection_log_softmax, static_argnames=('scale',)).lower(x, w, scale=1.0)
    bodies = ynn_bodies(compiled.compile().as_text())
    assert xla.compiler_options() in ({}, xla._CPU_OPTIONS)
    if xla.compiler_options():
        assert any(' dot(' in body for body in bodies)
        assert not any(' reduce(' in body for body in bodies)

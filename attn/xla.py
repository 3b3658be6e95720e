"""`jit`: jax.jit with the XLA options that make this project's programs fast on CPU.

XLA:CPU hands dots, elementwise ops and reductions to its YNNPACK library fusions. A
reduction over a dot's output (the log-softmax over the vocabulary after the output
projection) then fuses with the dot into one library call that runs about 3x slower than
the dot alone (a [128, 512] x [512, 32000] projection: 62 ms against 19 ms with the max
taken apart, on 2 cores). `jit` keeps those fusions to dots (`LIBRARY_FUSION_TYPE_DOT`)
where the running XLA has the option; elsewhere, and on other backends, it is plain
`jax.jit`.

The beam search uses it (base model, 32 sentences x 4 beams, vocabulary 32,000, on this
project's 2-core benchmark machine: 200 -> 215 target tokens/s); greedy search does not (its
[32, 32000] projection fuses well, and the option cost it 4%).
"""

from __future__ import annotations

import functools

import jax

_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}


@functools.cache
def compiler_options() -> dict[str, str]:
    """The options for this process's backend: `_CPU_OPTIONS` on a CPU whose XLA accepts
    them (checked by compiling a scalar program once), else none."""
    if jax.default_backend() != 'cpu':
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(1.0).compile()
    except Exception:  # noqa: BLE001 - an XLA without the option: run without it
        return {}
    return dict(_CPU_OPTIONS)


def jit(fun=None, **jit_kwargs):
    """jax.jit(fun, **jit_kwargs) with `compiler_options()`, made at the first call (when
    the backend is known); usable as a decorator, with or without keyword arguments."""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)

    @functools.cache
    def compiled():
        return jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        return compiled()(*args, **kwargs)

    call.lower = lambda *args, **kwargs: compiled().lower(*args, **kwargs)
    return call

"""Compiling once: JAX's persistent compilation cache for every command, and a count of the
seconds spent compiling, which reports give apart from the work itself.

The cache lives in $ATTN_COMPILATION_CACHE, by default <user cache dir>/attn/jax
($XDG_CACHE_HOME, else ~/.cache); ATTN_COMPILATION_CACHE=off turns it off. A directory set
through JAX's own JAX_COMPILATION_CACHE_DIR is kept. A second run of a command (a test set
translated again, a resumed training, an evaluation after training) loads its programs
instead of compiling them.
"""

from __future__ import annotations

import os

import jax

VARIABLE = 'ATTN_COMPILATION_CACHE'

# JAX's events of tracing, lowering and compiling a program (none on a cache hit but the
# first two, which are short).
_EVENTS = (
    '/jax/core/compile/jaxpr_trace_duration',
    '/jax/core/compile/jaxpr_to_mlir_module_duration',
    '/jax/core/compile/backend_compile_duration',
)
_seconds = [0.0]


def use_cache() -> str | None:
    """Turns the persistent compilation cache on (see the module's docstring); returns its
    directory, or None when it is off."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    setting = os.environ.get(VARIABLE, '')
    if setting.lower() == 'off':
        return None
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    directory = setting or os.path.join(base, 'attn', 'jax')
    jax.config.update('jax_compilation_cache_dir', directory)
    return directory


def seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling programs so far."""
    return _seconds[0]


def _count(event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in _EVENTS:
        _seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_count)

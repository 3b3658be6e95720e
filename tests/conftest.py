"""Test session setup: CPU only, and JAX's persistent compilation cache (compiles dominate)."""

import os
import pathlib

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(
    os.environ.get('ATTN_TEST_JAX_CACHE', pathlib.Path.home() / '.cache' / 'attn-jax')
)
# Through the environment, so the subprocesses that tests start share the cache too.
os.environ['JAX_COMPILATION_CACHE_DIR'] = str(_CACHE)
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.1'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
jax.config.update('jax_compilation_cache_dir', str(_CACHE))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


@pytest.fixture(scope='session')
def toy_run(tmp_path_factory):
    """(workdir, data) of a 6-step toy run with checkpoints at steps 3 and 6."""
    from attn import train
    from tests import toy

    directory = tmp_path_factory.mktemp('toy_run')
    data = toy.data(directory / 'tokenizer')
    workdir = str(directory / 'workdir')
    train.train_and_evaluate(toy.config(), workdir, data)
    return workdir, data

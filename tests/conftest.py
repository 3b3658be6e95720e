"""Test session setup: CPU only, several CPU devices, and JAX's persistent compilation cache
(compiles dominate).

The session runs on ATTN_TEST_DEVICES (default 2) CPU devices, so every command under test
runs sharded over a multi-device mesh, as on a host with several accelerators. The setting
goes through XLA_FLAGS, which the tests' subprocesses inherit; tests that compare device
counts set their own.
"""

import os
import pathlib

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
DEVICES = int(os.environ.get('ATTN_TEST_DEVICES', '2'))
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), f'--xla_force_host_platform_device_count={DEVICES}']
).strip()

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
    from attn.training import loop
    from tests import toy

    directory = tmp_path_factory.mktemp('toy_run')
    data = toy.data(directory / 'tokenizer')
    workdir = str(directory / 'workdir')
    loop.train_and_evaluate(toy.config(), workdir, data)
    return workdir, data


@pytest.fixture(scope='session')
def fixture_corpus(tmp_path_factory):
    """data_dir of the embedded corpus built from the builder tests' fixture packages,
    with its tokenizer (trained here, once, before any processes share it)."""
    from attn.data import datasets, debian, l10n_translate
    from tests import debian_packages as fixtures
    from tests.toy import l10n

    base = tmp_path_factory.mktemp('corpus')
    manual = base / 'manual'
    manual.mkdir()
    for package, files in fixtures.package_files().items():
        fixtures.write_deb(manual / f'{package}_4%3a7.4-1_all.deb', package, files)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(debian, 'apt_download', fixtures.refuse_download)
        l10n_translate.prepare('en-de', str(base / 'data'), manual_dir=str(manual))
    config = l10n.get_config('size=tiny')
    config.data.data_dir = str(base / 'data')
    datasets.load(config)
    return str(base / 'data')

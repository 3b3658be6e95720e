"""The embedded corpus builder on small fixtures: extraction, splits, metadata, array_record.

Fixtures are a tiny package tree laid out as the real Debian packages unpack (help pages in
two languages, a `.mo` catalog, Ding lines), packed into fake `.deb` files fed through TFDS's
`manual_dir`. apt and dpkg are faked where a test needs them; nothing reaches the network.
`pytest -m apt` builds the real corpus with apt.
"""

import gettext
import hashlib
import logging
import os
import shutil
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from attn.data import debian, l10n_translate
from attn.data.l10n_translate import Pair
from tests.debian_packages import (
    DING,
    EXPECTED_DING,
    EXPECTED_HELP_DE,
    EXPECTED_UI_DE,
    HELP_PAGES,
    MENU,
    MO_DE,
    package_files,
    refuse_download,
    write_deb,
    write_mo,
)


def md5_split(en):
    """The split rule, written independently of the module: per mille buckets of MD5."""
    bucket = int(hashlib.md5(en.encode()).hexdigest(), 16) % 1000
    return 'test' if bucket < 15 else 'validation' if bucket < 30 else 'train'


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    """The fixture tree, unpacked."""
    base = tmp_path_factory.mktemp('root')
    for files in package_files().values():
        for rel, data in files.items():
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / rel).write_bytes(data)
    return str(base)


@pytest.fixture(scope='module')
def manual_dir(tmp_path_factory):
    """The fixture tree as `.deb` files named as apt names them."""
    base = tmp_path_factory.mktemp('manual')
    for package, files in package_files().items():
        write_deb(base / f'{package}_4%3a7.4-1_all.deb', package, files)
    return str(base)


@pytest.fixture(scope='module')
def built(tmp_path_factory, manual_dir):
    """`l10n_translate/en-de` prepared from the fixture `.deb` files, and its data_dir."""
    data_dir = str(tmp_path_factory.mktemp('data'))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(debian, 'apt_download', refuse_download)
        return l10n_translate.prepare('en-de', data_dir, manual_dir=manual_dir), data_dir


def test_split_sentences_and_align():
    sentences = ['One.', 'Two!', '„Drei?" (Four) five.']
    assert debian.split_sentences(' '.join(sentences)) == sentences
    assert debian.split_sentences('e.g. lower case stays.') == ['e.g. lower case stays.']
    assert debian.align('A b. C d.', 'E f. G h.') == [('A b.', 'E f.'), ('C d.', 'G h.')]
    assert debian.align('A b. C d.', 'E f, g h.') == [('A b. C d.', 'E f, g h.')]


def test_help_paragraphs_are_aligned_by_page_and_id(root):
    paragraphs = debian.help_paragraphs(HELP_PAGES['shared/guide/a.html']['en-US'])
    assert paragraphs['hd_id101'] == 'Inserting Tables'  # nested markup flattened
    assert paragraphs['bm_id106'] == 'Tables;\ninserting'  # <br/> separates words
    assert 'other_1' not in paragraphs
    assert list(debian.help_pairs(root, 'de')) == EXPECTED_HELP_DE


def test_mo_catalogs(root, tmp_path):
    path = tmp_path / 'x.mo'
    path.write_bytes(write_mo(MO_DE))
    with open(path, 'rb') as f:
        catalog = gettext.GNUTranslations(f)  # the helper writes what gettext reads
    assert catalog.pgettext('menu', 'Open') == 'Öffnen'
    assert catalog.ngettext('File', 'Files', 2) == 'Dateien'
    assert sorted(debian.read_mo(str(path))) == sorted(MO_DE)
    assert list(debian.mo_pairs(MO_DE)) == EXPECTED_UI_DE
    assert len(list(debian.ui_pairs(root, 'de'))) == len(EXPECTED_UI_DE) + 400


def test_ding_pairs_kinds_tags_and_synonyms(root):
    assert list(debian.ding_pairs(root)) == EXPECTED_DING


def test_deduplicate_and_split_by_english_hash():
    a, b, c = Pair('a', ' x  y ', 'z'), Pair('b', 'x y', 'z'), Pair('b', 'x y', 'w')
    assert l10n_translate.deduplicate([a, b, c, Pair('a', '', 'q')]) == [Pair('a', 'x y', 'z'), c]
    english = [f'sentence {i}' for i in range(3000)]
    splits = l10n_translate.assign_splits(Pair('s', e, 't') for e in english)
    for name, members in splits.items():
        assert all(md5_split(p.en) == name for p in members)
    assert 20 < len(splits['test']) < 70 and 20 < len(splits['validation']) < 70


def test_config_names_and_packages():
    assert l10n_translate.config_name('en-de', ['ding-sentence', 'lo-ui', 'lo-help']) == 'en-de'
    mixture = 'en-de+lo-help+ding-word'
    assert l10n_translate.config_name('en-de', ['ding-word', 'lo-help']) == mixture
    config = l10n_translate.L10nTranslate.get_builder_config('en-de+ding-word+lo-help')
    assert config.sources == ('lo-help', 'ding-word') and config.name == mixture
    assert l10n_translate.make_config('en-fr').sources == ('lo-help', 'lo-ui')
    with pytest.raises(ValueError, match='German'):
        l10n_translate.config_name('en-fr', ['ding-sentence'])
    with pytest.raises(ValueError, match='subset'):
        l10n_translate.config_name('en-de', ['wmt'])
    french = ['libreoffice-help-en-us', 'libreoffice-help-fr', 'libreoffice-l10n-fr']
    assert l10n_translate.packages('fr', ['lo-help', 'lo-ui']) == french


def test_deb_version_and_unpacking_with_dpkg_or_python(tmp_path, manual_dir, monkeypatch):
    deb = os.path.join(manual_dir, 'trans-de-en_4%3a7.4-1_all.deb')
    assert debian.deb_version(deb) == '4:7.4-1'
    if shutil.which('dpkg-deb'):
        debian.unpack(deb, str(tmp_path / 'dpkg'))
        assert (tmp_path / 'dpkg' / debian.DING_FILE).read_text() == DING
    monkeypatch.setattr(debian.shutil, 'which', lambda name: None)
    debian.unpack(deb, str(tmp_path / 'py'))
    assert (tmp_path / 'py' / debian.DING_FILE).read_text() == DING


def expected_default_de():
    """The en-de default mixture from the expected pairs: first source wins a duplicate."""
    rows = [('lo-help', en, de) for en, de in EXPECTED_HELP_DE]
    rows += [('lo-ui', en, de) for en, de in EXPECTED_UI_DE + MENU['de']]
    rows += [(f'ding-{kind}', en, de) for kind, en, de in EXPECTED_DING if kind == 'sentence']
    first = {}
    for source, en, de in rows:
        first.setdefault((' '.join(en.split()), ' '.join(de.split())), source)
    return {(source, en, de) for (en, de), source in first.items()}


def test_built_dataset_reads_back_through_data_source(built):
    builder, data_dir = built
    expected = expected_default_de()
    for split in l10n_translate.SPLITS:
        source = tfds.data_source('l10n_translate/en-de', split=split, data_dir=data_dir)
        got = [
            tuple(source[i][k].decode() for k in ('source', 'en', 'de')) for i in range(len(source))
        ]
        assert len(got) == len(set(got)) > 0
        assert set(got) == {row for row in expected if md5_split(row[1]) == split}
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert 'tensorflow' not in sys.modules


def test_built_dataset_metadata(built):
    _, data_dir = built
    reloaded = tfds.builder('l10n_translate/en-de', data_dir=data_dir)
    metadata = reloaded.info.metadata
    assert metadata['packages']['libreoffice-help-de'] == '4:7.4-1'
    assert sorted(metadata['packages']) == l10n_translate.packages('de', metadata['sources'])
    assert len(metadata['deb_sha256']['trans-de-en']) == 64
    assert metadata['sources'] == ['lo-help', 'lo-ui', 'ding-sentence']
    counts = metadata['examples']
    assert sum(counts['train'].values()) == reloaded.info.splits['train'].num_examples
    # Help: 7 pairs less 1 repeated sentence; UI: 6 + 400; Ding: 4 sentences, one already
    # seen in the help; phrases and words are outside the default mixture.
    totals = {s: sum(c.get(s, 0) for c in counts.values()) for s in metadata['sources']}
    assert totals == {'lo-help': 6, 'lo-ui': 406, 'ding-sentence': 3}
    assert len(metadata['content_sha256']) == 64


def test_rebuild_is_identical_and_mixtures_choose_sources(built, manual_dir, tmp_path, monkeypatch):
    builder, _ = built
    monkeypatch.setattr(debian, 'apt_download', refuse_download)
    again = l10n_translate.prepare('en-de', str(tmp_path), manual_dir=manual_dir)
    assert again.info.metadata['content_sha256'] == builder.info.metadata['content_sha256']
    for split in l10n_translate.SPLITS:
        name = f'l10n_translate-{split}.array_record-00000-of-00001'
        assert (again.data_path / name).read_bytes() == (builder.data_path / name).read_bytes()
    mixture = l10n_translate.prepare(
        'en-de', str(tmp_path), sources=['lo-ui', 'ding-word'], manual_dir=manual_dir
    )
    counts = mixture.info.metadata['examples']
    assert mixture.builder_config.name == 'en-de+lo-ui+ding-word'
    assert {s for split in counts.values() for s in split} == {'lo-ui', 'ding-word'}
    french = l10n_translate.prepare('en-fr', str(tmp_path), manual_dir=manual_dir)
    assert 'fr' in french.info.features and french.info.metadata['sources'] == ['lo-help', 'lo-ui']


# ----------------------------------------------------------------------------- fetching


class FakeRun:
    """Records commands, fails the first `fail`; `apt-get download` writes PKG_1.0_all.deb."""

    def __init__(self):
        self.calls, self.fail = [], 0

    def __call__(self, cmd, cwd=None, **kwargs):
        self.calls.append(cmd)
        if len(self.calls) <= self.fail:
            return subprocess.CompletedProcess(cmd, 100, '', 'E: 404 Not Found')
        for package in cmd[2:] if cmd[:2] == ['apt-get', 'download'] else []:
            open(os.path.join(cwd, f'{package}_1.0_all.deb'), 'wb').close()
        return subprocess.CompletedProcess(cmd, 0, '', '')


@pytest.fixture
def apt(monkeypatch, tmp_path):
    """A fake apt: `apt-get` on the PATH, no package lists, root, recorded commands."""
    run, lists = FakeRun(), tmp_path  # no *_Packages* file yet
    monkeypatch.setattr(debian, 'APT_LISTS_DIR', str(lists))
    monkeypatch.setattr(debian.shutil, 'which', lambda name: f'/usr/bin/{name}')
    monkeypatch.setattr(debian.os, 'geteuid', lambda: 0)
    monkeypatch.setattr(debian.subprocess, 'run', run)
    return run, lists


def test_fetch_prefers_manual_dir_then_cache_and_downloads_the_rest(apt, tmp_path):
    run, lists = apt
    (lists / 'deb.debian.org_dists_main_binary-amd64_Packages').touch()
    manual, cache = tmp_path / 'manual', tmp_path / 'cache'
    manual.mkdir()
    (manual / 'a_2.0_all.deb').touch()
    debs = debian.fetch_debs(['a', 'b'], str(cache), str(manual))
    assert debs == {'a': str(manual / 'a_2.0_all.deb'), 'b': str(cache / 'b_1.0_all.deb')}
    assert run.calls == [['apt-get', 'download', 'b']]
    assert debian.fetch_debs(['a', 'b'], str(cache), str(manual)) == debs  # cached
    assert len(run.calls) == 1
    (manual / 'a_3.0_all.deb').touch()
    with pytest.raises(debian.DebianError, match='Several a_'):
        debian.fetch_debs(['a'], str(cache), str(manual))


def test_no_apt_lists_as_root_runs_apt_get_update_and_says_so(apt, tmp_path, caplog):
    run, _ = apt
    with caplog.at_level(logging.INFO):
        debian.fetch_debs(['a'], str(tmp_path / 'cache'))
    assert run.calls == [['apt-get', 'update'], ['apt-get', 'download', 'a']]
    assert 'running `apt-get update`' in caplog.text


def test_no_apt_lists_not_root_fails_at_once_with_the_command(apt, monkeypatch, tmp_path):
    run, _ = apt
    monkeypatch.setattr(debian.os, 'geteuid', lambda: 1000)
    with pytest.raises(debian.DebianError, match='sudo apt-get update'):
        debian.fetch_debs(['a'], str(tmp_path / 'cache'))
    assert run.calls == []


def test_stale_lists_as_root_update_and_retry(apt, tmp_path):
    run, lists = apt
    (lists / 'x_Packages').touch()
    run.fail = 1
    debian.fetch_debs(['a'], str(tmp_path / 'cache'))
    download = ['apt-get', 'download', 'a']
    assert run.calls == [download, ['apt-get', 'update'], download]


def test_without_apt_the_builder_says_which_debs_to_put_where(apt, monkeypatch, tmp_path):
    run, _ = apt
    monkeypatch.setattr(debian.shutil, 'which', lambda name: None)
    with pytest.raises(debian.DebianError, match=r'libreoffice-help-de_\*\.deb') as error:
        l10n_translate.prepare('en-de', str(tmp_path), manual_dir=str(tmp_path / 'manual'))
    assert str(tmp_path / 'manual') in str(error.value) and 'trans-de-en_*.deb' in str(error.value)
    assert run.calls == []


@pytest.mark.apt
@pytest.mark.parametrize('pair, minimum', [('en-de', 75_000), ('en-fr', 50_000)])
def test_real_corpus_through_apt(tmp_path, pair, minimum):
    builder = l10n_translate.prepare(pair, str(tmp_path))
    metadata = builder.info.metadata
    assert builder.info.splits['train'].num_examples >= minimum
    assert set(metadata['examples']['train']) == set(metadata['sources'])
    assert all(v for v in metadata['packages'].values())
    test = tfds.data_source(f'l10n_translate/{pair}', split='test', data_dir=str(tmp_path))
    assert len(test) == builder.info.splits['test'].num_examples > 500
    assert {'en', pair[3:], 'source'} == set(test[0])

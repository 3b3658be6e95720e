"""The embedded corpus: EN-DE / EN-FR sentence pairs from Debian's LibreOffice translation
packages and the Ding dictionary, as a TFDS builder prepared as array_record.

    from attn.data import l10n_translate
    builder = l10n_translate.prepare('en-de', data_dir)       # builds once, then reuses
    train = tfds.data_source('l10n_translate/en-de', split='train', data_dir=data_dir)
    train[0]  # {'en': b'...', 'de': b'...', 'source': b'lo-help'}

Sources (`source` feature of every example):
  lo-help        LibreOffice help pages, paragraphs matched by page and id, then sentences
                 (libreoffice-help-en-us + libreoffice-help-LANG; MPL-2.0)
  lo-ui          LibreOffice UI catalogs, `.mo` msgid -> msgstr (libreoffice-l10n-LANG; MPL-2.0)
  ding-sentence  Ding dictionary example sentences (trans-de-en, DE only; GPL-2+)
  ding-phrase    Ding multi-word entries (not in the default mixture)
  ding-word      Ding single-word entries (not in the default mixture)

Configs: `en-de` (lo-help + lo-ui + ding-sentence) and `en-fr` (lo-help + lo-ui) are the
default mixtures. Any other mixture is a config named by its pair and sources, e.g.
`l10n_translate/en-de+lo-help+ding-sentence+ding-phrase`.

Splits by a hash of the English side (1.5% test, 1.5% validation, the rest train), so one
English sentence never lands in two splits; pairs are deduplicated; the package versions,
`.deb` checksums, counts and a content hash are in `builder.info.metadata`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import tensorflow_datasets as tfds
from absl import logging

from attn.data import debian

PAIRS = {'en-de': 'de', 'en-fr': 'fr'}
SOURCES = ('lo-help', 'lo-ui', 'ding-sentence', 'ding-phrase', 'ding-word')
DEFAULT_SOURCES = {'de': ('lo-help', 'lo-ui', 'ding-sentence'), 'fr': ('lo-help', 'lo-ui')}
SPLITS = ('train', 'validation', 'test')
TEST_PER_MILLE = 15
VALIDATION_PER_MILLE = 15


class Pair(NamedTuple):
    """One example: where it comes from, the English side and the target side."""

    source: str
    en: str
    target: str


# ----------------------------------------------------------------------------- packages


def packages(lang: str, sources: Iterable[str]) -> list[str]:
    """The Debian packages that hold `sources` for target language `lang`."""
    wanted = []
    for source in sources:
        if source == 'lo-help':
            wanted += ['libreoffice-help-en-us', f'libreoffice-help-{lang}']
        elif source == 'lo-ui':
            wanted.append(f'libreoffice-l10n-{lang}')
        elif source.startswith('ding-'):
            wanted.append('trans-de-en')
    return sorted(set(wanted))


def all_packages() -> list[str]:
    """Every package any config may need (for `manual_dir` instructions)."""
    return sorted({p for lang in DEFAULT_SOURCES for p in packages(lang, SOURCES)})


# ----------------------------------------------------------------------------- corpus


def extract(root: str, lang: str, sources: Sequence[str]) -> Iterator[Pair]:
    """Raw pairs of `sources` from an unpacked package tree `root`, in a fixed order."""
    if 'lo-help' in sources:
        yield from (Pair('lo-help', en, t) for en, t in debian.help_pairs(root, lang))
    if 'lo-ui' in sources:
        yield from (Pair('lo-ui', en, t) for en, t in debian.ui_pairs(root, lang))
    if any(s.startswith('ding-') for s in sources):
        for kind, en, de in debian.ding_pairs(root):
            if f'ding-{kind}' in sources:
                yield Pair(f'ding-{kind}', en, de)


def deduplicate(pairs: Iterable[Pair]) -> list[Pair]:
    """Whitespace-normalized pairs, empty ones dropped, each (en, target) kept once (first)."""
    seen, out = set(), []
    for source, en, target in pairs:
        en, target = debian.normalize(en), debian.normalize(target)
        if en and target and (en, target) not in seen:
            seen.add((en, target))
            out.append(Pair(source, en, target))
    return out


def split_of(en: str) -> str:
    """`test`, `validation` or `train` by the MD5 of the English side (per mille buckets)."""
    bucket = int(hashlib.md5(en.encode('utf-8')).hexdigest(), 16) % 1000
    if bucket < TEST_PER_MILLE:
        return 'test'
    return 'validation' if bucket < TEST_PER_MILLE + VALIDATION_PER_MILLE else 'train'


def assign_splits(pairs: Iterable[Pair]) -> dict[str, list[Pair]]:
    """Split name -> pairs, in input order."""
    splits = {name: [] for name in SPLITS}
    for pair in pairs:
        splits[split_of(pair.en)].append(pair)
    return splits


def content_sha256(splits: Mapping[str, Sequence[Pair]]) -> str:
    """SHA-256 of every split's pairs as `split TAB source TAB en TAB target` lines."""
    digest = hashlib.sha256()
    for name in SPLITS:
        for pair in splits[name]:
            digest.update('\t'.join((name, *pair)).encode('utf-8') + b'\n')
    return digest.hexdigest()


def count(splits: Mapping[str, Sequence[Pair]]) -> dict[str, dict[str, int]]:
    """Split -> source -> number of pairs."""
    out = {}
    for name in SPLITS:
        out[name] = {}
        for pair in splits[name]:
            out[name][pair.source] = out[name].get(pair.source, 0) + 1
    return out


def corpus_metadata(
    debs: Mapping[str, str], splits: Mapping[str, Sequence[Pair]], sources: Sequence[str]
) -> dict:
    """What the dataset was built from: package versions, `.deb` checksums, counts, hash."""
    return {
        'packages': {p: debian.deb_version(path) for p, path in sorted(debs.items())},
        'deb_files': {p: os.path.basename(path) for p, path in sorted(debs.items())},
        'deb_sha256': {p: debian.sha256_file(path) for p, path in sorted(debs.items())},
        'sources': list(sources),
        'examples': count(splits),
        'content_sha256': content_sha256(splits),
    }


def build_corpus(
    debs: Mapping[str, str], lang: str, sources: Sequence[str]
) -> dict[str, list[Pair]]:
    """Unpacks `debs` into a temporary tree and returns the deduplicated, split pairs."""
    with tempfile.TemporaryDirectory(prefix='l10n_translate-') as root:
        for deb in debs.values():
            debian.unpack(deb, root)
        return assign_splits(deduplicate(extract(root, lang, sources)))


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(eq=False)
class L10nConfig(tfds.core.BuilderConfig):
    """A language pair and the sources mixed into it."""

    lang: str = 'de'
    sources: tuple[str, ...] = ()


def config_name(pair: str, sources: Iterable[str] | None = None) -> str:
    """`pair` for its default mixture, else `pair+source+source...` in canonical order."""
    if pair not in PAIRS:
        raise ValueError(f'Unknown pair {pair!r}; expected one of {sorted(PAIRS)}.')
    chosen = _canonical_sources(PAIRS[pair], sources)
    return pair if chosen == DEFAULT_SOURCES[PAIRS[pair]] else '+'.join((pair, *chosen))


def _canonical_sources(lang: str, sources: Iterable[str] | None) -> tuple[str, ...]:
    """`sources` in the order of `SOURCES`, checked; the default mixture if None."""
    if sources is None:
        return DEFAULT_SOURCES[lang]
    sources = set(sources)
    unknown = sources - set(SOURCES)
    if unknown or not sources:
        raise ValueError(f'Sources must be a non-empty subset of {SOURCES}; got {sources}.')
    if lang != 'de' and any(s.startswith('ding-') for s in sources):
        raise ValueError('The Ding dictionary is German-English only.')
    return tuple(s for s in SOURCES if s in sources)


@functools.cache
def make_config(name: str) -> L10nConfig:
    """The config called `name` (`en-de`, `en-fr` or `PAIR+SOURCE+...`); one object per name."""
    pair, *sources = name.split('+')
    canonical = config_name(pair, sources or None)
    if canonical != name:
        return make_config(canonical)
    lang = PAIRS[pair]
    chosen = _canonical_sources(lang, sources or None)
    return L10nConfig(
        name=canonical,
        description=f'English-{lang.upper()} pairs from: {", ".join(chosen)}.',
        lang=lang,
        sources=chosen,
    )


# ----------------------------------------------------------------------------- builder

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Normally nothing to do: the builder runs `apt-get download` (and, as root on a machine with
no apt lists, `apt-get update`) and caches the files in <download_dir>/debian. Without apt
(not Debian/Ubuntu), put the Debian packages of the config in the manual dir
(<data_dir>/downloads/manual by default), any version, named as Debian names them:
{chr(10).join(f'  {p}_*.deb' for p in all_packages())}
(en-de needs the -de packages and trans-de-en, en-fr the -fr packages; both need
libreoffice-help-en-us). They are unpacked with dpkg-deb -x, or in Python without dpkg.
"""


class L10nTranslate(tfds.core.GeneratorBasedBuilder):
    """EN-DE / EN-FR pairs from LibreOffice's help and UI translations and Ding."""

    name = 'l10n_translate'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'LibreOffice help + UI, Ding sentences/phrases/words.'}
    BUILDER_CONFIGS = [make_config('en-de'), make_config('en-fr')]
    DEFAULT_BUILDER_CONFIG_NAME = 'en-de'
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def __init__(self, *, file_format=None, **kwargs):
        """As any builder, but written and read as array_record unless told otherwise."""
        super().__init__(file_format=file_format or 'array_record', **kwargs)

    @classmethod
    def get_builder_config(cls, name, version=None):
        """Registered configs, plus any mixture named `PAIR+SOURCE+...`."""
        config = super().get_builder_config(name, version)
        if config is None and name.split('+')[0] in PAIRS:
            config = make_config(name)
        return config

    def _info(self) -> tfds.core.DatasetInfo:
        lang = self.builder_config.lang
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({'en': text, lang: text, 'source': text}),
            supervised_keys=('en', lang),
            homepage=f'https://packages.debian.org/stable/libreoffice-help-{lang}',
            license='MPL-2.0 (LibreOffice); GPL-2.0-or-later (Ding, trans-de-en)',
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        debs = debian.fetch_debs(
            packages(config.lang, config.sources),
            cache_dir=os.fspath(dl_manager.download_dir / 'debian'),
            manual_dir=_manual_dir(dl_manager),
        )
        splits = build_corpus(debs, config.lang, config.sources)
        for name, pairs in splits.items():
            if not pairs:  # TFDS cannot write an empty split
                raise ValueError(f'{config.name}: no {name} examples; the input is too small.')
        metadata = corpus_metadata(debs, splits, config.sources)
        logging.info('%s from %s: %s', config.name, metadata['packages'], metadata['examples'])
        self.info.metadata.update(metadata)
        return {name: self._generate_examples(pairs) for name, pairs in splits.items()}

    def _generate_examples(self, pairs: Sequence[Pair]):
        lang = self.builder_config.lang
        for i, pair in enumerate(pairs):
            yield i, {'en': pair.en, lang: pair.target, 'source': pair.source}


def _manual_dir(dl_manager) -> str | None:
    """The configured manual dir, whether or not it exists yet.

    `dl_manager.manual_dir` raises when the folder is missing or empty, but an error
    message still has to name it, so read the path the download manager was given.
    """
    path = getattr(dl_manager, '_manual_dir', None)
    return os.fspath(path) if path else None


# ----------------------------------------------------------------------------- public API


def prepare(
    pair: str = 'en-de',
    data_dir: str | None = None,
    *,
    sources: Iterable[str] | None = None,
    manual_dir: str | None = None,
) -> tfds.core.DatasetBuilder:
    """Builds `l10n_translate/<pair>` as array_record (unless already built); the builder.

    Args:
      pair: `en-de` or `en-fr` (or a whole config name, `en-de+lo-help+ding-phrase`).
      data_dir: TFDS data dir (default: TFDS's, `~/tensorflow_datasets`).
      sources: the mixture (subset of `SOURCES`); None for the pair's default.
      manual_dir: a folder with the `.deb` files, for machines without apt.
    """
    name = pair if sources is None else config_name(pair, sources)
    builder = L10nTranslate(config=make_config(name).name, data_dir=data_dir)
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=manual_dir),
    )
    return builder

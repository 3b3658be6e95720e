"""Debian packages as a data source: fetch `.deb` files with apt, unpack them, extract text.

Two halves. Fetching (`fetch_debs`, `unpack`) talks to apt and dpkg and is the only part that
touches the system. Extraction (`help_pairs`, `ui_pairs`, `ding_pairs`) is pure: it reads an
unpacked root directory (the tree `dpkg-deb -x` writes) and yields aligned sentence pairs.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import tarfile
import urllib.parse
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser

from absl import logging

from attn.errors import UserError

APT_LISTS_DIR = '/var/lib/apt/lists'
_STALE_HINT = 'If the package lists are stale, run `sudo apt-get update` and retry. '
HELP_DIR = 'usr/share/libreoffice/help'
UI_DIR = 'usr/lib/libreoffice/program/resource'
DING_FILE = 'usr/share/trans/de-en'


class DebianError(UserError, RuntimeError):
    """Raised when the `.deb` files cannot be fetched or unpacked; the message says what to do
    (commands print it as one line, no traceback)."""


# ----------------------------------------------------------------------------- fetching


def manual_instructions(packages: Iterable[str], manual_dir: str | None = None) -> str:
    """How to supply the packages by hand: the file names expected in TFDS's `manual_dir`."""
    where = manual_dir or '<data_dir>/downloads/manual'
    names = '\n'.join(f'  {p}_*.deb' for p in packages)
    return (
        f'Place these Debian package files (any version, from any Debian/Ubuntu mirror or '
        f'https://packages.debian.org) in {where}:\n{names}\n'
        f'or pass another folder as tfds.download.DownloadConfig(manual_dir=...).'
    )


def has_apt_lists(lists_dir: str | None = None) -> bool:
    """Whether apt has package lists (`apt-get update` has run at least once)."""
    return bool(glob.glob(os.path.join(lists_dir or APT_LISTS_DIR, '*_Packages*')))


def ensure_apt_lists(lists_dir: str | None = None) -> None:
    """Runs `apt-get update` when apt has no package lists and we are root; else raises."""
    lists_dir = lists_dir or APT_LISTS_DIR
    if has_apt_lists(lists_dir):
        return
    if os.geteuid() != 0:
        raise DebianError(
            f'apt has no package lists ({lists_dir} is empty), so `apt-get download` cannot '
            'find the packages. Run this once, then retry:\n  sudo apt-get update'
        )
    logging.info('apt has no package lists in %s: running `apt-get update` (as root).', lists_dir)
    _run(['apt-get', 'update'])


def find_deb(package: str, folders: Iterable[str | None]) -> str | None:
    """The `.deb` of `package` in the first folder that holds one; None if none does.

    Several versions in one folder are an error rather than a guess: the build must be
    reproducible from what the folder holds.
    """
    for folder in folders:
        if folder:
            found = sorted(glob.glob(os.path.join(glob.escape(folder), f'{package}_*.deb')))
            if len(found) > 1:
                raise DebianError(f'Several {package}_*.deb in {folder}: {found}; keep one.')
            if found:
                return found[0]
    return None


def fetch_debs(
    packages: Iterable[str], cache_dir: str, manual_dir: str | None = None
) -> dict[str, str]:
    """Paths of the `.deb` of each package: from `manual_dir`, the cache, or `apt-get download`.

    Downloads land in `cache_dir`, so a rebuild does not fetch again.
    """
    packages = list(packages)
    found = {p: find_deb(p, [manual_dir, cache_dir]) for p in packages}
    missing = [p for p, path in found.items() if path is None]
    if missing:
        apt_download(missing, cache_dir, manual_dir)
        for p in missing:
            found[p] = find_deb(p, [cache_dir])
            if found[p] is None:
                raise DebianError(f'apt-get download gave no {p}_*.deb in {cache_dir}.')
    return found


def apt_download(packages: list[str], dest: str, manual_dir: str | None = None) -> None:
    """`apt-get download PACKAGES` into `dest`, running `apt-get update` first if needed."""
    if shutil.which('apt-get') is None:
        raise DebianError(
            'apt-get is not available (not a Debian/Ubuntu system), so the packages '
            f'{", ".join(packages)} cannot be downloaded.\n'
            + manual_instructions(packages, manual_dir)
        )
    ensure_apt_lists()
    os.makedirs(dest, exist_ok=True)
    cmd = ['apt-get', 'download', *packages]
    logging.info('%s (into %s)', ' '.join(cmd), dest)
    try:
        _run(cmd, cwd=dest, hint=_STALE_HINT + manual_instructions(packages, manual_dir))
    except DebianError:
        if os.geteuid() != 0:
            raise
        # Old versions leave the mirror after a rebuild: stale lists point at missing files.
        logging.info('apt-get download failed: running `apt-get update` and trying again.')
        _run(['apt-get', 'update'])
        _run(cmd, cwd=dest, hint=manual_instructions(packages, manual_dir))


def deb_version(path: str) -> str:
    """The version in a `.deb` file name `NAME_VERSION_ARCH.deb` (epoch `%3a` decoded)."""
    parts = os.path.basename(path)[: -len('.deb')].split('_')
    if len(parts) != 3:
        raise DebianError(f'{path}: not a NAME_VERSION_ARCH.deb file name.')
    return urllib.parse.unquote(parts[1])


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def unpack(deb: str, root: str) -> None:
    """Unpacks a `.deb` into `root` with `dpkg-deb -x`, or in Python where dpkg is missing."""
    os.makedirs(root, exist_ok=True)
    if shutil.which('dpkg-deb'):
        _run(['dpkg-deb', '-x', deb, root])
    else:
        extract_deb(deb, root)


def extract_deb(deb: str, root: str) -> None:
    """Unpacks the regular files of a `.deb` (an `ar` archive holding `data.tar.*`) into `root`.

    The fallback for systems without dpkg; handles xz, gzip, bzip2 and plain tar members.
    """
    data = _ar_member(deb, 'data.tar')
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode='r:*')
    except tarfile.ReadError as e:
        raise DebianError(
            f'{deb}: cannot read its data archive in Python (zstd?); install dpkg (dpkg-deb).'
        ) from e
    with tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
        tar.extractall(root, members=members, filter='data')


def _ar_member(path: str, prefix: str) -> bytes:
    """The bytes of the first member of `ar` archive `path` whose name starts with `prefix`."""
    with open(path, 'rb') as f:
        if f.read(8) != b'!<arch>\n':
            raise DebianError(f'{path}: not a .deb (ar) archive.')
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip('/'), int(header[48:58])
            body = f.read(size + size % 2)[:size]
            if name.startswith(prefix):
                return body
    raise DebianError(f'{path}: no {prefix}* member.')


def _run(cmd: list[str], cwd: str | None = None, hint: str = '') -> None:
    """Runs `cmd`, raising `DebianError` with its stderr (and `hint`) if it fails."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DebianError(
            f'`{" ".join(cmd)}` failed ({result.returncode}):\n{result.stderr.strip()}\n{hint}'
        )


# ----------------------------------------------------------------------------- extraction

_SENTENCE_BREAK = re.compile(r'(?<=[.!?])\s+(?=[A-ZÄÖÜÀÂÉÈÊÎÔ"„“«(])')
_HELP_ID = re.compile(r'(par|hd|bm)_id')
_HELP_TAGS = {'p', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'td', 'li'}
_VOID_TAGS = {'br', 'img', 'meta', 'link', 'input', 'hr'}


def normalize(text: str) -> str:
    """Collapses runs of whitespace to one space and strips the ends."""
    return re.sub(r'\s+', ' ', text).strip()


def split_sentences(text: str) -> list[str]:
    """Splits at `.`, `!` or `?` followed by space and an upper-case letter, quote or `(`."""
    return _SENTENCE_BREAK.split(text)


def align(source: str, target: str) -> list[tuple[str, str]]:
    """Sentence pairs of two parallel paragraphs: zipped if both split into the same number
    of sentences, else the whole paragraphs as one pair."""
    src, tgt = split_sentences(source), split_sentences(target)
    return list(zip(src, tgt, strict=True)) if len(src) == len(tgt) else [(source, target)]


class _HelpParser(HTMLParser):
    """Collects the text of `<p>/<h*>/<td>/<li>` elements whose id is `par_id*/hd_id*/bm_id*`
    (LibreOffice's paragraph ids, the same in every language), nested markup flattened."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str | None, list[str]]] = []
        self.paragraphs: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        if tag in _VOID_TAGS:
            if tag == 'br' and self.stack:  # a line break separates words
                self.stack[-1][2].append('\n')
            return
        pid = dict(attrs).get('id')
        keep = pid if pid and _HELP_ID.match(pid) and tag in _HELP_TAGS else None
        self.stack.append((tag, keep, []))

    def handle_endtag(self, tag):
        for depth in range(len(self.stack) - 1, -1, -1):
            if self.stack[depth][0] == tag:
                while len(self.stack) > depth:
                    _, pid, parts = self.stack.pop()
                    text = ''.join(parts)
                    if pid:
                        self.paragraphs[pid] = text
                    if self.stack:
                        self.stack[-1][2].append(text)
                return

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2].append(data)


def help_paragraphs(html: str) -> dict[str, str]:
    """Paragraph id -> text of one LibreOffice help page."""
    parser = _HelpParser()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


def help_tree(root: str, code: str) -> dict[tuple[str, str], str]:
    """(page path, paragraph id) -> text for every help page of language `code` under `root`."""
    base = os.path.join(root, HELP_DIR, code)
    out = {}
    for folder, _, files in os.walk(base):
        for name in files:
            if name.endswith('.html'):
                path = os.path.join(folder, name)
                with open(path, encoding='utf-8', errors='replace') as f:
                    paragraphs = help_paragraphs(f.read())
                rel = os.path.relpath(path, base)
                out.update(((rel, pid), text) for pid, text in paragraphs.items())
    return out


def help_pairs(root: str, lang: str) -> Iterator[tuple[str, str]]:
    """(English, target) sentence pairs of the LibreOffice help, matched by page and id."""
    english, target = help_tree(root, 'en-US'), help_tree(root, lang)
    for key in sorted(english):
        en, tgt = normalize(english[key]), normalize(target.get(key, ''))
        if en and tgt and en != tgt:
            yield from align(en, tgt)


def read_mo(path: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) entries of a GNU `.mo` catalog, in file order, decoded as UTF-8."""
    with open(path, 'rb') as f:
        data = f.read()
    for order in '<>':
        magic, _, count, ids_at, strs_at = struct.unpack_from(order + '5I', data)
        if magic == 0x950412DE:
            break
    else:
        raise ValueError(f'{path}: not a .mo file.')

    def string(table: int, i: int) -> str:
        length, offset = struct.unpack_from(order + '2I', data, table + 8 * i)
        return data[offset : offset + length].decode('utf-8')

    return [(string(ids_at, i), string(strs_at, i)) for i in range(count)]


def mo_pairs(entries: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """(English, target) pairs of `.mo` entries: context and plural forms dropped, `~`
    accelerators removed, multi-line entries split line by line when the counts match."""
    for msgid, msgstr in entries:
        en = msgid.split('\x00')[0].split('\x04')[-1].replace('~', '')
        tgt = msgstr.split('\x00')[0].replace('~', '')
        if en and tgt and en != tgt:
            src_lines, tgt_lines = en.split('\n'), tgt.split('\n')
            if len(src_lines) == len(tgt_lines):
                yield from zip(src_lines, tgt_lines, strict=True)
            else:
                yield en, tgt


def ui_pairs(root: str, lang: str) -> Iterator[tuple[str, str]]:
    """(English, target) pairs of every LibreOffice UI catalog of `lang` under `root`."""
    pattern = os.path.join(root, UI_DIR, lang, 'LC_MESSAGES', '*.mo')
    for path in sorted(glob.glob(pattern)):
        yield from mo_pairs(read_mo(path))


_DING_TAG = re.compile(r'\s*(\{[^}]*\}|\[[^\]]*\])')
_DING_PAREN = re.compile(r'\s*\([^)]*\)')
_FINAL_PUNCT = re.compile(r'[.?!]$')


def _ding_clean(text: str) -> str:
    """A Ding entry without `{grammar}` and `[domain]` tags."""
    return normalize(_DING_TAG.sub('', text)).strip(' ,')


def ding_kind(en: str, de: str) -> str:
    """`sentence` (both sides >= 3 words with final punctuation), `phrase` (>= 2 words on
    one side) or `word`."""
    en_words, de_words = len(en.split()), len(de.split())
    if _FINAL_PUNCT.search(en) and _FINAL_PUNCT.search(de) and min(en_words, de_words) >= 3:
        return 'sentence'
    return 'phrase' if max(en_words, de_words) >= 2 else 'word'


def ding_line_pairs(line: str) -> Iterator[tuple[str, str, str]]:
    """(kind, English, German) pairs of one Ding line `DE | DE :: EN | EN` (`;` separates
    synonyms, zipped when both sides have as many; parenthesized notes are dropped)."""
    if line.startswith('#') or ' :: ' not in line:
        return
    de_side, en_side = line.rstrip('\n').split(' :: ', 1)
    for de_group, en_group in zip(de_side.split(' | '), en_side.split(' | '), strict=False):
        de_alts = [_ding_clean(s) for s in de_group.split(';')]
        en_alts = [_ding_clean(s) for s in en_group.split(';')]
        if len(de_alts) == len(en_alts):
            alts = list(zip(de_alts, en_alts, strict=True))
        else:
            alts = [(de_alts[0], en_alts[0])]
        for de, en in alts:
            if '(' in de or '(' in en:
                de, en = _DING_PAREN.sub('', de).strip(), _DING_PAREN.sub('', en).strip()
            if de and en:
                yield ding_kind(en, de), en, de


def ding_pairs(root: str) -> Iterator[tuple[str, str, str]]:
    """(kind, English, German) pairs of the Ding dictionary under `root`."""
    with open(os.path.join(root, DING_FILE), encoding='utf-8') as f:
        for line in f:
            yield from ding_line_pairs(line)

"""Fixture Debian packages for the corpus builder: a tiny tree laid out as the real
packages unpack (help pages in two languages, `.mo` catalogs, Ding lines), what the
builder should extract from it, and `.deb` files of it (an ar archive of tars)."""

import io
import os
import struct
import tarfile

from attn.data import debian

HELP = 'usr/share/libreoffice/help'
HELP_PAGES = {  # page -> language -> html; page b repeats a sentence of page a
    'shared/guide/a.html': {
        'en-US': """<html><head><meta charset="utf-8"><title>T</title></head><body>
<h1 id="hd_id101">Inserting <span class="x">Tables</span></h1>
<p id="par_id102">Choose Table - Insert. The dialog opens.</p>
<p id="par_id103">Click OK. Then close it. Done.</p>
<p id="par_id104">LibreOffice</p>
<p id="par_id105">Only in English.</p>
<p id="other_1">Not a paragraph id.</p>
<table><tr><td><p id="bm_id106">Tables;<br/>inserting</p></td></tr></table>
</body></html>""",
        'de': """<html><body>
<h1 id="hd_id101">Tabellen <span>einfügen</span></h1>
<p id="par_id102">Wählen Sie Tabelle - Einfügen. Der Dialog öffnet sich.</p>
<p id="par_id103">Klicken Sie auf OK, dann schließen Sie ihn. Fertig.</p>
<p id="par_id104">LibreOffice</p>
<p id="other_1">Kein Absatz.</p>
<table><tr><td><p id="bm_id106">Tabellen;<br/>einfügen</p></td></tr></table>
</body></html>""",
        'fr': '<h1 id="hd_id101">Insérer des tableaux</h1>',
    },
    'swriter/b.html': {
        'en-US': '<p id="par_id201">The dialog opens.</p><p id="par_id202">Many\n   gaps.</p>',
        'de': '<p id="par_id201">Der Dialog öffnet sich.</p><p id="par_id202">Viele  Lücken.</p>',
    },
}
EXPECTED_HELP_DE = [  # sorted by (page, paragraph id)
    ('Tables; inserting', 'Tabellen; einfügen'),
    ('Inserting Tables', 'Tabellen einfügen'),
    ('Choose Table - Insert.', 'Wählen Sie Tabelle - Einfügen.'),
    ('The dialog opens.', 'Der Dialog öffnet sich.'),
    ('Click OK. Then close it. Done.', 'Klicken Sie auf OK, dann schließen Sie ihn. Fertig.'),
    ('The dialog opens.', 'Der Dialog öffnet sich.'),
    ('Many gaps.', 'Viele Lücken.'),
]
MO_DE = [
    ('', 'Content-Type: text/plain; charset=UTF-8\n'),
    ('~Save', '~Speichern'),
    ('menu\x04Open', 'Öffnen'),
    ('File\x00Files', 'Datei\x00Dateien'),
    ('Line one\nLine two', 'Zeile eins\nZeile zwei'),
    ('Three\nlines\nhere', 'Zwei\nZeilen'),
    ('OK', 'OK'),
    ('Untranslated', ''),
]
EXPECTED_UI_DE = [
    ('Save', 'Speichern'),
    ('Open', 'Öffnen'),
    ('File', 'Datei'),
    ('Line one', 'Zeile eins'),
    ('Line two', 'Zeile zwei'),
    ('Three\nlines\nhere', 'Zwei\nZeilen'),
]
DING = """# Version :: test
Haus {n}; Gebäude {n} :: house; building
Das ist mein Haus. :: This is my house.
Er geht nach Hause. [ugs.] | Sie gehen nach Hause. :: He goes home. [coll.] | They go home.
ein Haus bauen (für jdn.) :: to build a house (for sb.)
Auto {n}; Wagen {m}; Karre {f} :: car; automobile
Der Dialog öffnet sich. :: The dialog opens.
a line without a separator
"""
EXPECTED_DING = [
    ('word', 'house', 'Haus'),
    ('word', 'building', 'Gebäude'),
    ('sentence', 'This is my house.', 'Das ist mein Haus.'),
    ('sentence', 'He goes home.', 'Er geht nach Hause.'),
    ('sentence', 'They go home.', 'Sie gehen nach Hause.'),
    ('phrase', 'to build a house', 'ein Haus bauen'),
    ('word', 'car', 'Auto'),
    ('sentence', 'The dialog opens.', 'Der Dialog öffnet sich.'),
]
# Enough UI strings that every split gets some (3% land outside train).
MENU = {
    lang: [(f'Menu entry {i}', f'{word} {i}') for i in range(400)]
    for lang, word in (('de', 'Menüeintrag'), ('fr', 'Entrée de menu'))
}


def write_mo(entries):
    """A GNU `.mo` catalog (little endian, no hash table) of (msgid, msgstr) entries."""
    columns = list(zip(*sorted((k.encode(), v.encode()) for k, v in entries), strict=True))
    n, table, blob = len(entries), b'', b''
    for strings in columns:
        for string in strings:
            table += struct.pack('<2I', len(string), 28 + 16 * n + len(blob))
            blob += string + b'\x00'
    return struct.pack('<7I', 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0) + table + blob


def tar_bytes(files, mode):
    """A tar archive of `files` (path -> bytes) under `./`, with its folders."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:
        for folder in sorted({os.path.dirname(p[:i]) for p in files for i in range(len(p))}):
            info = tarfile.TarInfo(f'./{folder}')
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(f'./{path}')
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_deb(path, package, files):
    """A `.deb` (ar: debian-binary, control.tar.gz, data.tar.xz) holding `files`."""
    control = f'Package: {package}\nVersion: 1.0\nArchitecture: all\nDescription: test\n'
    members = [('debian-binary', b'2.0\n')]
    members += [('control.tar.gz', tar_bytes({'control': control.encode()}, 'w:gz'))]
    members += [('data.tar.xz', tar_bytes(files, 'w:xz'))]
    with open(path, 'wb') as f:
        f.write(b'!<arch>\n')
        for name, data in members:
            f.write(f'{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n'.encode())
            f.write(data + b'\n' * (len(data) % 2))


def package_files():
    """Package -> (relative path -> bytes): the fixture tree, split as Debian splits it."""
    files = {'trans-de-en': {debian.DING_FILE: DING.encode()}}
    for lang in ('en-US', 'de', 'fr'):
        package = 'libreoffice-help-' + lang.lower()
        pages = [(page, text[lang]) for page, text in HELP_PAGES.items() if lang in text]
        files[package] = {f'{HELP}/{lang}/text/{page}': html.encode() for page, html in pages}
    for lang in ('de', 'fr'):
        mo = write_mo(MO_DE + MENU[lang])
        files[f'libreoffice-l10n-{lang}'] = {f'{debian.UI_DIR}/{lang}/LC_MESSAGES/sw.mo': mo}
    return files


def refuse_download(packages, *args, **kwargs):
    """Stands in for `debian.apt_download` where nothing may reach the network."""
    raise AssertionError(f'a test tried to download {packages}')

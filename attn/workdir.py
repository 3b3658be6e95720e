"""The layout of a run's directory, and the lock that gives it one trainer at a time.

W/config.json        the resolved config
W/tokenizer.json     the tokenizer's fingerprint (a hash of its pieces), checked on resume
W/.lock              host, pid and start time of the trainer using W (while it runs)
W/checkpoints/       Orbax checkpoints (state, data iterator, config) by step
W/tensorboard/       TensorBoard event files
W/metrics.jsonl      one JSON object per logged step / evaluation
W/eval/              evaluation reports, <split>-<step>.json
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
from collections.abc import Iterator

import jax
from absl import logging

from attn import distributed
from attn.errors import UserError

LOCK = '.lock'
TOKENIZER = 'tokenizer.json'


class WorkdirError(UserError, RuntimeError):
    """A workdir that cannot be used (held by another trainer, not writable, ...)."""


def checkpoints(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), 'checkpoints')


def write_config(workdir: str, config) -> None:
    """Creates the workdir and writes config.json (process 0)."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
            f.write(config.to_json_best_effort(indent=2) + '\n')


def saved_config(workdir: str) -> dict | None:
    """W/config.json as a dict, or None when there is none (or it cannot be read)."""
    try:
        with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's pieces in id order: what an embedding row means."""
    pieces = '\n'.join(tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size))
    return hashlib.sha256(pieces.encode('utf-8')).hexdigest()


def check_tokenizer(workdir: str, tokenizer) -> None:
    """Raises WorkdirError when W/tokenizer.json records another tokenizer than `tokenizer`
    (runs saved before the file existed have none: nothing to check)."""
    path = os.path.join(workdir, TOKENIZER)
    try:
        with open(path, encoding='utf-8') as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return
    found = tokenizer_fingerprint(tokenizer)
    if saved.get('sha256') != found:
        raise WorkdirError(
            f'The checkpoints in {workdir} were trained with another tokenizer (sha256 '
            f'{str(saved.get("sha256"))[:12]}..., {saved.get("path")}) than this run builds '
            f'({found[:12]}..., {getattr(tokenizer, "path", None)}): resuming would read its '
            'embeddings with the wrong pieces. Use the data the run was trained with, or a '
            'new --workdir.'
        )


def write_tokenizer(workdir: str, tokenizer) -> None:
    """Writes W/tokenizer.json (process 0)."""
    if jax.process_index() == 0:
        record = {
            'sha256': tokenizer_fingerprint(tokenizer),
            'vocab_size': tokenizer.vocab_size,
            'path': str(getattr(tokenizer, 'path', None)),
        }
        with open(os.path.join(workdir, TOKENIZER), 'w', encoding='utf-8') as f:
            json.dump(record, f, indent=1)
            f.write('\n')


# --------------------------------------------------------------------------------- lock


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
    """Holds W/.lock while the block runs, and removes it however the block ends.

    Process 0 takes the lock (created with O_EXCL: of two trainers, one wins); the other
    processes of a multi-process run wait for its answer and refuse with it. A lock left by
    a dead process of this host is taken over with a warning; a live holder, or one on
    another host (which cannot be checked from here), is refused, naming it.
    """
    path, refusal = None, None
    if jax.process_index() == 0:
        try:
            path = _take(workdir)
        except WorkdirError as error:
            refusal = error
    if distributed.agreed_max([refusal is not None])[0]:
        raise refusal or WorkdirError(f'Process 0 could not lock {workdir}: see its log.')
    try:
        yield
    finally:
        if path is not None:
            _release(path)


def _holder() -> dict:
    since = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
    return {'host': socket.gethostname(), 'pid': os.getpid(), 'since': since}


def _take(workdir: str) -> str:
    """Creates W (if needed) and W/.lock holding this process; returns the lock's path."""
    path = os.path.join(workdir, LOCK)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise _unwritable(workdir, error) from None
    try:
        return _create(path)
    except FileExistsError:
        pass
    except OSError as error:
        raise _unwritable(workdir, error) from None
    holder = _read(path)
    if holder is None:
        raise WorkdirError(
            f'{path} exists but does not say which trainer holds {workdir}. If no trainer is '
            f'running on it, delete {path} and run again.'
        )
    who = f'host {holder.get("host")}, pid {holder.get("pid")}, since {holder.get("since")}'
    if holder.get('host') != socket.gethostname():
        raise WorkdirError(
            f'{workdir} is in use by a trainer on another host ({who}; {path}), which cannot be '
            f'checked from {socket.gethostname()}. Wait for it to finish; if that run is dead, '
            f'delete {path} and run again.'
        )
    if _alive(holder.get('pid')):
        raise WorkdirError(
            f'{workdir} is in use by another trainer ({who}; {path}). Wait for it to finish, '
            f'or use another --workdir; if that process is gone, delete {path}.'
        )
    logging.warning(
        'Taking over %s, left by process %s, which has exited (%s).', path, holder.get('pid'), who
    )
    os.remove(path)
    try:
        return _create(path)
    except FileExistsError:  # another trainer took it over first
        raise WorkdirError(f'{workdir} was just taken by another trainer ({path}).') from None


def _create(path: str) -> str:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
        json.dump(_holder(), f)
        f.write('\n')
    return path


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding='utf-8') as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(pid) -> bool:
    """Whether process `pid` of this host exists (one of another user's counts)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(path: str) -> None:
    """Removes the lock if it is still this process's (never one taken over since)."""
    holder = _read(path)
    if holder and holder.get('pid') == os.getpid() and holder.get('host') == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _unwritable(workdir: str, error: OSError) -> WorkdirError:
    reason = f'{error.strerror or type(error).__name__}: {error.filename or workdir}'
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        reason = f'{existing} is a file, not a directory'
    return WorkdirError(
        f'Cannot write to the workdir {workdir} ({reason}). Choose a --workdir in a writable '
        'directory, or fix its permissions.'
    )

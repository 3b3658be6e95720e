"""The layout of a run's directory, and the lock that gives it one trainer at a time.

A run's directory is self-contained: translate, score (of given files), analyze (of given
files or a prompt), average and export need W alone, not the dataset it was trained on.

W/config.json        the resolved config
W/tokenizer/         the SentencePiece model the run is trained with: spm.model (and the
                     meta.json of its training)
W/tokenizer.json     its fingerprint (a hash of its pieces), checked on resume and on use
W/.lock              host, pid and start time of the trainer using W (while it runs)
W/checkpoints/       Orbax checkpoints (state, data iterator, config) by step
W/tensorboard/       TensorBoard event files
W/metrics.jsonl      one JSON object per logged step / evaluation
W/eval/              evaluation reports, <split>-<step>[-avgK][-beamB-alphaA].json: named by
                     what produced them (`report_name`), so no setting overwrites another's
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from typing import Any

import jax
from absl import logging
from flax import nnx
from jax.sharding import Mesh
from ml_collections import config_dict

from attn import configs
from attn.data import tokenizer as tokenizer_lib
from attn.errors import UserError
from attn.model import build_model
from attn.training import checkpoint, distributed, sharding

LOCK = '.lock'
TOKENIZER = 'tokenizer.json'  # the fingerprint of W/tokenizer/'s model
TOKENIZER_DIR = 'tokenizer'
EVAL_DIR = 'eval'
MODEL_FILE = tokenizer_lib.MODEL_FILE


class WorkdirError(UserError, RuntimeError):
    """A workdir that cannot be used (held by another trainer, not writable, ...)."""


def checkpoints(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), 'checkpoints')


def report_name(split: str, steps: list[int], search: tuple[int, float] | None) -> str:
    """The name of the evaluation report in W/eval/ of `split` at checkpoint `steps` (the
    mean of several), decoded by the beam search `search` (beam size, alpha); None for a
    language model, which only has a perplexity."""
    name = f'{split}-{steps[-1]}' + (f'-avg{len(steps)}' if len(steps) > 1 else '')
    if search is not None:
        beam_size, alpha = search
        name += f'-beam{beam_size}-alpha{alpha:g}'
    return name


def read_report(workdir: str, split: str, step: int, config) -> dict | None:
    """The report of `split` at checkpoint `step` alone, decoded with the config's own search
    (config.decode), or None when there is none. A report written before reports were named
    by their search, <split>-<step>.json, counts."""
    search = None
    if config.model_kind == 'transformer':
        search = (config.decode.beam_size, config.decode.alpha)
    for name in (report_name(split, [step], search), f'{split}-{step}'):
        path = os.path.join(workdir, EVAL_DIR, f'{name}.json')
        if os.path.exists(path):
            with open(path, encoding='utf-8') as f:
                return json.load(f)
    return None


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
# W/tokenizer/ holds the SentencePiece model the run was trained with, so that every later
# command needs W alone (a run copied to a laptop translates without its dataset);
# W/tokenizer.json records its fingerprint, checked whenever either side is read.


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's pieces in id order: what an embedding row means."""
    pieces = '\n'.join(tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size))
    return hashlib.sha256(pieces.encode('utf-8')).hexdigest()


def _recorded(workdir: str) -> dict | None:
    """W/tokenizer.json, or None (runs saved before the file existed have none)."""
    try:
        with open(os.path.join(workdir, TOKENIZER), encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _mismatch(workdir: str, tokenizer) -> str | None:
    """'(recorded sha256..., path) ... (found sha256..., path)' when `tokenizer` is not the
    one W/tokenizer.json records; None when it is, or when none is recorded."""
    saved = _recorded(workdir)
    if saved is None:
        return None
    found = tokenizer_fingerprint(tokenizer)
    if saved.get('sha256') == found:
        return None
    return (
        f'(sha256 {str(saved.get("sha256"))[:12]}..., {saved.get("path")}) than '
        f'{getattr(tokenizer, "path", None)} (sha256 {found[:12]}...)'
    )


def check_tokenizer(workdir: str, tokenizer) -> None:
    """Raises WorkdirError when W/tokenizer.json, or the model in W/tokenizer/, is another
    tokenizer than `tokenizer`, the one a resumed run builds (runs saved before either
    existed have nothing to check)."""
    mismatch = _mismatch(workdir, tokenizer)
    if mismatch is None and os.path.exists(os.path.join(workdir, TOKENIZER_DIR, MODEL_FILE)):
        saved = tokenizer_lib.Tokenizer.load(os.path.join(workdir, TOKENIZER_DIR))
        if tokenizer_fingerprint(saved) != tokenizer_fingerprint(tokenizer):
            mismatch = f'({saved.path}) than {getattr(tokenizer, "path", None)}'
    if mismatch is not None:
        raise WorkdirError(
            f'The checkpoints in {workdir} were trained with another tokenizer {mismatch}, '
            'the one this run builds: resuming would read its embeddings with the wrong '
            'pieces. Use the data the run was trained with, or a new --workdir.'
        )


def write_tokenizer(workdir: str, tokenizer) -> None:
    """Writes the model to W/tokenizer/ and its fingerprint to W/tokenizer.json (process 0)."""
    if jax.process_index() == 0:
        record = {
            'sha256': tokenizer_fingerprint(tokenizer),
            'vocab_size': tokenizer.vocab_size,
            'path': str(getattr(tokenizer, 'path', None)),
        }
        tokenizer.save(os.path.join(workdir, TOKENIZER_DIR))
        with open(os.path.join(workdir, TOKENIZER), 'w', encoding='utf-8') as f:
            json.dump(record, f, indent=1)
            f.write('\n')


def tokenizer(workdir: str, config=None) -> tokenizer_lib.Tokenizer:
    """The tokenizer run W was trained with: W/tokenizer/, checked against the fingerprint
    in W/tokenizer.json. Runs written before W/tokenizer/ existed read it, as they did,
    from the dataset of `config` (default W/config.json), with a warning.

    Raises WorkdirError when the model found is not the one W/tokenizer.json records.
    """
    directory = os.path.join(workdir, TOKENIZER_DIR)
    if os.path.exists(os.path.join(directory, MODEL_FILE)):
        found = tokenizer_lib.Tokenizer.load(directory)
        fix = f'Copy the tokenizer/ and {TOKENIZER} of the run together, unchanged.'
    else:
        from attn.data import datasets  # only runs this old need the data stack (TFDS)

        config = _saved_or_refuse(workdir) if config is None else config
        logging.warning(
            '%s has no %s/ (written before runs kept their tokenizer): reading the tokenizer '
            'from its dataset, %s in %s, as before.',
            workdir,
            TOKENIZER_DIR,
            datasets.builder_name(config.data),
            datasets.data_dir(config.data),
        )
        found = datasets.load(config, ['train']).tokenizer
        fix = 'Point --config.data.data_dir at the data the run was trained with.'
    mismatch = _mismatch(workdir, found)
    if mismatch is not None:
        raise WorkdirError(
            f'{workdir} was trained with another tokenizer {mismatch}: its token ids would '
            f'read as other pieces. {fix}'
        )
    return found


def _saved_or_refuse(workdir: str) -> config_dict.ConfigDict:
    saved = saved_config(workdir)
    if saved is None:
        raise WorkdirError(
            f'{workdir} has neither {TOKENIZER_DIR}/ nor a readable config.json: is it the '
            'workdir of a trained run?'
        )
    return configs.upgrade(saved)


def copy_tokenizer(workdir: str, out: str) -> None:
    """Copies W/tokenizer/ and W/tokenizer.json, where W has them, into `out` (process 0)."""
    if jax.process_index() != 0:
        return
    if os.path.isdir(os.path.join(workdir, TOKENIZER_DIR)):
        shutil.copytree(
            os.path.join(workdir, TOKENIZER_DIR),
            os.path.join(out, TOKENIZER_DIR),
            dirs_exist_ok=True,
        )
    if os.path.isfile(os.path.join(workdir, TOKENIZER)):
        shutil.copyfile(os.path.join(workdir, TOKENIZER), os.path.join(out, TOKENIZER))


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


# ------------------------------------------------------------ restore for use
# A trained model back from a workdir, for use rather than for resuming: evaluation,
# translation, analysis, averaging and export, on whatever devices and processes this run
# has (any topology can have written it).
#
#     run = rundir.load('runs/l10n', average_last=5)
#     run.model(inputs, targets)      # an nnx.Module: mask heads, capture attention...
#     best = rundir.load('runs/l10n', step=rundir.BEST)  # lowest validation perplexity
#
# Only parameters are read (never the Adam moments), placed on this run's mesh with the
# shardings the train step uses. Averaging is a running sum: one checkpoint's parameters
# are restored at a time, so memory is two parameter sets whatever the number averaged.


@dataclasses.dataclass
class Run:
    config: config_dict.ConfigDict  # the config the checkpoint was trained with
    model: nnx.Module
    steps: list[int]  # checkpoint steps whose parameters `model` holds (averaged if several)
    mesh: Mesh | None = None  # where the parameters live; decoding shards batches over it

    @property
    def step(self) -> int:
        return self.steps[-1]


def open_checkpoints(workdir: str) -> checkpoint.Checkpointer:
    """The workdir's checkpoints, read-only; names the fix when there are none."""
    directory = checkpoints(workdir)
    train_first = f'train first (python -m attn.train --config=... --workdir={workdir}).'
    if not os.path.isdir(directory):
        what = 'does not exist' if not os.path.exists(workdir) else 'has no checkpoints/'
        raise checkpoint.CheckpointError(
            f'Workdir {workdir} {what}: check the path, or {train_first}'
        )
    ckpt = checkpoint.Checkpointer(directory, keep=None, async_save=False, create=False)
    if not ckpt.all_steps():
        ckpt.close()
        raise checkpoint.CheckpointError(f'No checkpoint in {directory}: {train_first}')
    return ckpt


BEST = 'best'  # a step argument: the kept checkpoint of lowest validation perplexity


def resolve_step(ckpt: checkpoint.Checkpointer, step: int | str | None) -> int | None:
    """`step`, with BEST replaced by the kept step of lowest validation perplexity (as
    saved with it by training); CheckpointError naming the fix when none has one."""
    if step != BEST:
        return step
    best = ckpt.best_step()
    if best is None:
        raise checkpoint.CheckpointError(
            f'--step={BEST}: no checkpoint in {ckpt.directory} has a validation perplexity '
            'recorded (written before training recorded it, or none saved at an evaluated '
            f'step). Give --step=N for one of {ckpt.all_steps()}, or leave --step out for '
            'the latest.'
        )
    return best


def select_steps(available: list[int], step: int | None, average_last: int) -> list[int]:
    """The last `average_last` checkpoint steps up to `step` (default: the latest)."""
    if average_last < 1:
        raise checkpoint.CheckpointError(
            f'average_last={average_last}: give the number of checkpoints to average, 1 or '
            f'more (1 = no averaging; there are {len(available)}: {available}).'
        )
    step = available[-1] if step is None else step
    if step not in available:
        raise checkpoint.CheckpointError(f'No checkpoint of step {step}; there are {available}.')
    steps = [s for s in available if s <= step][-average_last:]
    if len(steps) < average_last:
        raise checkpoint.CheckpointError(
            f'Averaging the last {average_last} checkpoints up to step {step} (--average_last, '
            f"or attn.average's --last), but the kept ones up to it are {steps}. "
            f'Average {len(steps)} or fewer, or keep more (config.keep_checkpoints) in a new run.'
        )
    return steps


def running_mean(restore_one: Callable[[int], Any], steps: list[int]) -> Any:
    """Mean of the parameter trees `restore_one(step)` over `steps`, restoring one tree at
    a time and adding it to a running sum (at most the sum and one tree are held)."""
    total = None
    for step in steps:
        tree = restore_one(step)
        total = tree if total is None else jax.tree.map(lambda a, b: a + b, total, tree)
        del tree
    return total if len(steps) == 1 else jax.tree.map(lambda x: x / len(steps), total)


def load_params(
    workdir: str, *, step: int | str | None = None, average_last: int = 1, mesh: Mesh
) -> tuple[config_dict.ConfigDict, list[int], Any]:
    """(config, steps, parameters as saved: nested dicts of arrays on `mesh`) of checkpoint
    `step` (default: the newest readable; BEST: the best kept), or the mean over the last
    `average_last` kept checkpoints up to it."""

    def read(ckpt, steps):
        config = _config_at(ckpt, steps)

        def shardings(tree):
            return sharding.state_shardings(tree, mesh, config.sharding)

        def restore_one(s):
            return _read_step(s, lambda: ckpt.restore_params(s, shardings))

        return config, steps, running_mean(restore_one, steps)

    return _newest_readable(workdir, step, average_last, read)


def checkpoint_config(
    workdir: str, *, step: int | str | None = None, average_last: int = 1
) -> tuple[config_dict.ConfigDict, list[int]]:
    """(config, steps) that `load_params` would read, without reading any parameters."""

    return _newest_readable(
        workdir, step, average_last, lambda ckpt, steps: (_config_at(ckpt, steps), steps)
    )


def _config_at(ckpt: checkpoint.Checkpointer, steps: list[int]) -> config_dict.ConfigDict:
    """The config saved with the last of `steps`, through `configs.upgrade`."""
    return configs.upgrade(_read_step(steps[-1], lambda: ckpt.restore_config(steps[-1])))


class _Damaged(Exception):
    """Checkpoint `step` cannot be read."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step = step


def _read_step(step: int, read: Callable[[], Any]) -> Any:
    """read(), with a failure to read checkpoint `step` raised as _Damaged; a checkpoint that
    is readable but refused (CheckpointError: another model, not attn's) as it is."""
    try:
        return read()
    except checkpoint.CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever Orbax or TensorStore raise
        raise _Damaged(step, checkpoint.short_error(error)) from error


def _newest_readable(workdir: str, step, average_last: int, read: Callable) -> Any:
    """read(ckpt, steps) of the `average_last` steps ending at `step`. Without `step` or
    averaging, a latest checkpoint that cannot be read is named in a warning and the one
    before it is used, its files left as they are (training sets it aside when it resumes);
    a step that was asked for, or averaged over, is refused naming it. Every process
    agrees on what was readable, so none goes on while another stops."""
    ckpt = open_checkpoints(workdir)
    try:
        available, end = ckpt.all_steps(), resolve_step(ckpt, step)
        while True:
            steps = select_steps(available, end, average_last)
            damaged, result = None, None
            try:
                result = read(ckpt, steps)
            except _Damaged as error:
                damaged = error
            bad = int(distributed.agreed_max([-1 if damaged is None else damaged.step])[0])
            if bad < 0:
                return result
            reason = str(damaged) if damaged is not None else 'unreadable on another process'
            path = os.path.join(ckpt.directory, str(bad))
            available = [s for s in available if s != bad]
            if end is not None or len(steps) > 1 or not available:
                others = f'the others kept are {available}' if available else 'none other is kept'
                raise checkpoint.CheckpointError(
                    f'Checkpoint {path} cannot be read ({reason}). Give --step (and '
                    f'--average_last) to leave it out: {others}. Its files are left as they are.'
                )
            logging.warning(
                'Checkpoint %s cannot be read (%s): using step %d, the newest readable one. '
                'Its files are left as they are.',
                path,
                reason,
                available[-1],
            )
    finally:
        ckpt.close()


def load(
    workdir: str,
    *,
    step: int | str | None = None,
    average_last: int = 1,
    mesh: Mesh | None = None,
) -> Run:
    """The model of checkpoint `step` (default: latest; BEST: the kept one of lowest
    validation perplexity), or the mean of the parameters of the last `average_last`
    checkpoints up to it, on `mesh` (default: every device of every process)."""
    mesh = mesh or sharding.make_mesh()
    config, steps, params = load_params(workdir, step=step, average_last=average_last, mesh=mesh)
    return Run(config=config, model=build(config, mesh, params), steps=steps, mesh=mesh)


def build(config: config_dict.ConfigDict, mesh: Mesh, saved_params: Any) -> nnx.Module:
    """The model of `config` holding `saved_params` (checked against its shapes), its other
    state (head masks, ...) initialized and replicated on `mesh`. No second set of
    parameters is ever made: the initializer's are dropped by the compiler."""
    cfg = configs.model_config(config)

    def fresh():
        return build_model(config.model_kind, cfg)

    graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(fresh), nnx.Param, ...)
    rest = jax.jit(
        lambda: nnx.split(fresh(), nnx.Param, ...)[2], out_shardings=sharding.replicated(mesh)
    )()
    params = checkpoint.into_structure(abstract_params, saved_params)
    return nnx.merge(graphdef, params, rest)

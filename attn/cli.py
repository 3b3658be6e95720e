"""`attn <command> [flags]`: the same as `python -m attn.<command> [flags]`."""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import jax
from absl import app, flags
from ml_collections import config_dict, config_flags

from attn import compilation, configs
from attn.errors import ConfigError, UserError

COMMANDS = {
    'prepare': "build a config's dataset and tokenizer ahead of a launch",
    'train': 'train a config in a workdir (resumes from its latest checkpoint)',
    'evaluate': 'BLEU and perplexity of a checkpoint on a whole split',
    'compare': 'runs against the first on one test set, with paired significance tests',
    'translate': 'translate stdin line by line (or continue prompts with a language model)',
    'score': 'log-probabilities of given translations (or text) under a checkpoint',
    'analyze': 'attention maps, head statistics, head importance and pruning of a checkpoint',
    'average': "the mean of a run's last K checkpoints, written as a checkpoint",
    'summary': 'parameters per module and FLOPs per token of a config',
    'export': 'a checkpoint as a Hugging Face MarianMT and/or CTranslate2 model directory',
    'plot': 'learning curves of several runs on shared axes, legends naming config differences',
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        lines = [f'  {name:10s} {help_}' for name, help_ in COMMANDS.items()]
        usage = 'usage: attn <command> [--flags]\n\ncommands:\n' + '\n'.join(lines) + '\n'
        if sys.argv[1:2] in (['-h'], ['--help'], ['help']):  # asked for: stdout, success
            sys.stdout.write(usage + '\n`attn <command> --helpfull` lists its flags.\n')
            raise SystemExit(0)
        sys.stderr.write(usage)
        raise SystemExit(2)
    command = sys.argv[1]
    sys.argv = [f'attn {command}', *sys.argv[2:]]
    importlib.import_module(f'attn.{command}').run()


def define_config_flag() -> None:
    """--config=configs/NAME.py[:args] plus --config.a.b=v overrides (once per process).

    Commands define their flags in `run()`, not at import, so that importing several
    command modules (as tests and notebooks do) never defines a flag twice.
    """
    if 'config' not in flags.FLAGS:
        config_flags.DEFINE_config_file(
            'config',
            None,
            'Experiment config file, e.g. configs/l10n.py:size=tiny.',
            lock_config=True,
        )


class _StepParser(flags.ArgumentParser):
    """A checkpoint step: a number, or rundir.BEST."""

    def parse(self, argument):
        from attn import rundir  # not at import: restore brings the data stack

        if argument == rundir.BEST:
            return argument
        try:
            return int(argument)
        except ValueError:
            raise ValueError(f'{argument!r}: give a step number or {rundir.BEST}') from None

    def flag_type(self) -> str:
        return "int or 'best'"


def define_step_flag(help_: str = 'Checkpoint step (default: the latest)') -> None:
    """--step: a checkpoint step, or `best`: the kept one of lowest validation perplexity."""
    flags.DEFINE(
        _StepParser(), 'step', None, f'{help_}; best: the kept one of lowest validation perplexity.'
    )


def check_flag(name: str, ok: Callable[[Any], bool], fix: str) -> None:
    """Refuses --name while the flags are parsed, before any work, unless `ok(value)` (an
    unset flag, None, always passes): `error: flag --name=value: fix`, exit status 2."""
    flags.register_validator(name, lambda value: value is None or ok(value), message=fix)


def at_least(name: str, low: int, fix: str) -> None:
    """`check_flag`: --name >= low."""
    check_flag(name, lambda value: value >= low, fix)


def define_checkpoint_flags() -> None:
    """--step and --average_last, for the commands that read a checkpoint or a mean."""
    define_step_flag()
    flags.DEFINE_integer(
        'average_last',
        1,
        'Average the parameters of the last K kept checkpoints up to --step (1: no '
        'averaging); with --step=best, those ending at the best (older ones are kept only '
        'while among the latest config.keep_checkpoints).',
    )
    at_least('average_last', 1, 'give 1 or more checkpoints to average (1 = no averaging).')


def define_search_flags(batch_size: int | None = None, nbest: bool = True) -> None:
    """--beam_size, --alpha and (unless not `nbest`) --nbest: the beam search of
    attn.translate, attn.evaluate and attn.compare; with `batch_size`, --batch_size too (its
    default)."""
    flags.DEFINE_integer('beam_size', None, "Beam size (default: the config's); 1 = greedy.")
    at_least('beam_size', 1, "give 1 or more (1 = greedy); leave it out for the config's.")
    flags.DEFINE_float('alpha', None, "Length penalty exponent (default: the config's).")
    at_least('alpha', 0, 'give 0 (no length penalty) or more; the paper uses 0.6.')
    if nbest:
        flags.DEFINE_integer(
            'nbest', 0, 'Also write the K best beam hypotheses (K <= --beam_size).'
        )
        at_least('nbest', 0, 'give 0 (no lists) or a number of hypotheses up to --beam_size.')
    if batch_size is not None:
        flags.DEFINE_integer('batch_size', batch_size, 'Lines translated together.')
        at_least('batch_size', 1, 'give 1 or more lines per batch.')


def define_sampling_flags(max_new_tokens: int) -> None:
    """--max_new_tokens, --temperature, --top_k, --top_p and --seed: a language model's
    sampling."""
    flags.DEFINE_integer('max_new_tokens', max_new_tokens, 'Language models: tokens to add.')
    at_least('max_new_tokens', 1, 'give 1 or more tokens to add.')
    flags.DEFINE_float('temperature', 1.0, 'Language models: sampling temperature (0: greedy).')
    at_least('temperature', 0, "give 0 (greedy) or more; 1 samples the model's distribution.")
    flags.DEFINE_integer('top_k', 0, 'Language models: sample from the k likeliest (0 = all).')
    at_least('top_k', 0, 'give 0 (every token) or a number of tokens to sample from.')
    flags.DEFINE_float('top_p', 1.0, 'Language models: nucleus sampling mass.')
    check_flag(
        'top_p', lambda p: 0 < p <= 1, 'give a probability mass in (0, 1]; 1 keeps every token.'
    )
    flags.DEFINE_integer('seed', 0, 'Language models: sampling seed.')


def config(validate: bool = True):
    """The --config value, refused (one line) if it cannot work: its file is missing, or
    `configs.validate` fails. That check counts one device, since counting them would
    start JAX's backend before `jax.distributed`; `train_and_evaluate` checks the real count.
    `validate=False` for configs that are not `attn.train`'s (the studies in experiments/).
    A usage error when --config is missing."""
    value = flags.FLAGS.config
    if value is None:
        raise app.UsageError('--config is required, e.g. --config=configs/l10n.py')
    if not isinstance(value, config_dict.ConfigDict):  # ml_collections defers a failed load
        try:
            value.lock()
        except OSError as error:
            raise UserError(_unloadable(flags.FLAGS['config'].config_filename, error)) from None
    if validate:
        configs.validate(value, devices=1)
    return value


def workdir() -> str:
    """The --workdir value; a usage error when it is missing."""
    value = flags.FLAGS.workdir
    if value is None:
        raise app.UsageError('--workdir is required.')
    return value


def run(main) -> None:
    """`absl.app.run(main)` with the persistent compilation cache on (`attn.compilation`),
    reporting the user's errors as one line, not a traceback: bad flags (a missing config
    file, a bad :arg, a misspelt --config.field) and the ConfigErrors, UserErrors and
    non-finite losses that `main` raises."""

    def guarded(argv):
        compilation.use_cache()
        try:
            return main(argv)
        except (ConfigError, UserError) as error:
            _fail(error)
        except FloatingPointError as error:  # attn.train's non-finite loss, naming the fixes
            if jax.config.jax_debug_nans or jax.config.jax_debug_infs:
                raise  # the user asked where: keep the traceback
            _fail(error)

    app.run(guarded, flags_parser=_parse_flags)


def _fail(message) -> NoReturn:
    sys.stderr.write(f'error: {" ".join(str(message).split())}\n')  # one line, however wrapped
    raise SystemExit(2) from None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a bad --config is reported by `_fail`, other bad flags too."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, OSError, KeyError, AttributeError) as error:
        message = _flag_error(error, argv)
        if message is None:
            raise  # not the user's settings: a bug, with its traceback
        _fail(message)


def _flag_error(error: BaseException, argv: list[str]) -> str | None:
    """The one-line message for an error of flag parsing, or None if it is not the user's."""
    chain = []  # outermost first; ml_collections and absl wrap a config's own error
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for cause in reversed(chain):
        if isinstance(cause, (ConfigError, UserError)):
            return str(cause)  # e.g. from configs.parse_arg
    argument = _config_argument(argv)
    if argument is not None and isinstance(chain[-1], OSError):
        return _unloadable(argument, chain[-1])
    if isinstance(chain[0], (KeyError, AttributeError)):
        return _misspelt_override(argv, argument)
    if isinstance(chain[0], flags.Error) and '\n' not in str(chain[0]):
        unknown = isinstance(chain[0], flags.UnrecognizedFlagError)
        return f'{chain[0]}' + (' (--helpfull lists the flags)' if unknown else '')
    return None


def _config_argument(argv: list[str]) -> str | None:
    """X of --config=X (or --config X) in argv."""
    for i, arg in enumerate(argv):
        name, sep, value = arg.lstrip('-').partition('=')
        if arg.startswith('-') and name == 'config':
            return value if sep else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _unloadable(argument: str, error: BaseException) -> str:
    path = argument.split(':', 1)[0]
    if os.path.isfile(path):
        reason = str(error.__cause__ or error).strip().splitlines()
        return f'--config={argument} could not be loaded: {reason[-1] if reason else error!r}'
    folder = os.path.dirname(path) or '.'
    configs = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            file = os.path.join(folder, name)
            if name.endswith('.py') and os.path.isfile(file):
                with open(file, encoding='utf-8', errors='replace') as f:
                    if 'def get_config' in f.read():
                        configs.append(file)
    where = f'the configs there are {configs}' if configs else f'paths are from {os.getcwd()}'
    return f'--config={argument}: there is no file {path}; {where}.'


def _misspelt_override(argv: list[str], argument: str | None) -> str | None:
    """'--config.a.b=v: config.a has no field b; did you mean --config.a.c?' for the first
    override naming a field the config lacks (the config file is loaded again), or None."""
    if argument is None:
        return None
    try:
        loaded = flags.FLAGS['config'].parser.parse(argument)
    except Exception:  # noqa: BLE001 - it loaded once; if not now, report the original error
        return None
    for arg in argv:
        match = re.match(r'-{1,2}(?:no)?config\.([^=]+)', arg)
        node, path = loaded, ['config']
        for name in match.group(1).split('.') if match else []:
            where = '.'.join(path)
            if not isinstance(node, config_dict.ConfigDict):
                return f'{arg}: {where} is a single value, not a group of fields.'
            if name not in node:
                close = difflib.get_close_matches(name, list(node.keys()), n=1)
                fix = f'did you mean --{where}.{close[0]}?' if close else f'it has {list(node)}.'
                return f'{arg}: {where} has no field {name!r}; {fix}'
            node = node[name]
            path.append(name)
    return None

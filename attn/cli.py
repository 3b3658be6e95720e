"""`attn <command> [flags]`: the same as `python -m attn.<command> [flags]`."""

from __future__ import annotations

import importlib
import sys

from absl import app, flags
from ml_collections import config_flags

from attn.errors import UserError
from attn.model import ConfigError

COMMANDS = {
    'prepare': "build a config's dataset and tokenizer ahead of a launch",
    'train': 'train a config in a workdir (resumes from its latest checkpoint)',
    'evaluate': 'BLEU and perplexity of a checkpoint on a whole split',
    'translate': 'translate stdin line by line (or continue prompts with a language model)',
    'analyze': 'attention maps, head statistics, head importance and pruning of a checkpoint',
    'average': "the mean of a run's last K checkpoints, written as a checkpoint",
    'summary': 'parameters per module and FLOPs per token of a config',
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        lines = [f'  {name:10s} {help_}' for name, help_ in COMMANDS.items()]
        sys.stderr.write('usage: attn <command> [--flags]\n\ncommands:\n' + '\n'.join(lines) + '\n')
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


def config():
    """The --config value; a usage error when it is missing."""
    value = flags.FLAGS.config
    if value is None:
        raise app.UsageError('--config is required, e.g. --config=configs/l10n.py')
    return value


def run(main) -> None:
    """`absl.app.run(main)`, reporting the user's errors as one line, not a traceback."""

    def guarded(argv):
        try:
            return main(argv)
        except (ConfigError, UserError) as error:
            sys.stderr.write(f'error: {error}\n')
            raise SystemExit(2) from None

    app.run(guarded)

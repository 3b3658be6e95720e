"""Runs attn commands in forked children of one process that imports them once, so that a
table of bad flags goes through the real commands quickly:

    python -m tests.command_flags < cases.json

reads a JSON list of [command, [args...]] and prints a JSON list of [exit status, stderr],
one per case, in order.
"""

import importlib
import json
import os
import sys
import tempfile

from attn.cli import COMMANDS


def run_case(command: str, args: list[str]) -> tuple[int, str]:
    with tempfile.TemporaryFile('w+') as log:
        pid = os.fork()
        if pid == 0:  # the child: the command, its stderr into `log`
            os.dup2(log.fileno(), 2)
            sys.argv = [f'attn {command}', *args]
            code = 1
            try:
                importlib.import_module(f'attn.{command}').run()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        log.seek(0)
        return os.waitstatus_to_exitcode(status), log.read()


if __name__ == '__main__':
    cases = json.load(sys.stdin)
    for name in {command for command, _ in cases}:
        assert name in COMMANDS, name
        importlib.import_module(f'attn.{name}')  # once, before the forks
    print(json.dumps([run_case(command, args) for command, args in cases]))  # noqa: T201

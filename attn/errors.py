"""Errors that are the user's to fix; commands report them as one line, not a traceback."""


class UserError(Exception):
    """A missing dataset, an unreadable checkpoint, ...: the message names the fix."""


class ConfigError(ValueError):
    """A setting that cannot work; the message names the field and the fix."""


# Exit statuses of the commands: 0 done; 2 a UserError, ConfigError or bad flag (one line
# on stderr); 1 a crash (a traceback). attn.train exits PREEMPTED when it stopped early at
# a SIGTERM or Ctrl-C after saving its checkpoint: the same command resumes it, so a
# scheduler or retry loop should run it again (launch/ does). 75 is sysexits.h's EX_TEMPFAIL.
PREEMPTED = 75

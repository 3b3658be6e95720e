"""Trains the toy config in a workdir: `python -m tests.toy_train WORKDIR TOKENIZER_DIR
[WORKERS]` (WORKERS: config.data.worker_count, default 0).

A separate process, so a test can kill it with SIGKILL mid-run and start it again.
"""

import sys

from attn.training import loop
from tests import toy

if __name__ == '__main__':
    workdir, tokenizer_dir, *workers = sys.argv[1:]
    config = toy.config(total_steps=12, checkpoint_every_steps=2, keep_checkpoints=3)
    config.data.worker_count = int(workers[0]) if workers else 0
    loop.train_and_evaluate(config, workdir, toy.data(tokenizer_dir))

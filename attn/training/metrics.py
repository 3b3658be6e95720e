"""Where training reports go: TensorBoard event files (no TensorFlow needed),
`metrics.jsonl` for scripts, and a console progress bar. Process 0 writes; the
others keep quiet.
"""

from __future__ import annotations

import json
import os
import time

import jax
import tqdm
from absl import logging
from tensorboardX import SummaryWriter


def truncate_jsonl(path: str, last_step: int) -> int:
    """Drops the rows of `path` past `last_step` (and any unreadable line); returns how many.

    A run killed after logging step S+k but before its next checkpoint resumes from S and
    logs S+1.. again; without this those rows would appear twice. The file is rewritten
    through a temporary file and `os.replace`, so a kill here leaves the old or the new file.
    """
    if not os.path.exists(path):
        return 0
    with open(path, encoding='utf-8') as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if isinstance(row, dict) and int(row.get('step', 0)) <= last_step:
            kept.append(line if line.endswith('\n') else line + '\n')
    if kept != lines:  # also when only the last line's newline was lost
        temporary = f'{path}.tmp'
        with open(temporary, 'w', encoding='utf-8') as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    return len(lines) - len(kept)


class MetricsWriter:
    """Writes scalar rows to `workdir/tensorboard/` and `workdir/metrics.jsonl`.

    `resume_step`: the step training (re)starts from (0 for a fresh run). Rows already
    logged past it are dropped from metrics.jsonl and hidden from TensorBoard (its
    `purge_step`), since training logs those steps again. None keeps everything.
    """

    def __init__(self, workdir: str, resume_step: int | None = None):
        self.active = jax.process_index() == 0
        self._tensorboard = None
        self._jsonl = None
        if self.active:
            jsonl = os.path.join(workdir, 'metrics.jsonl')
            purge_step = None
            if resume_step is not None:
                purge_step = int(resume_step) + 1
                dropped = truncate_jsonl(jsonl, int(resume_step))
                if dropped:
                    logging.info(
                        'metrics.jsonl: dropped %d rows past step %d.', dropped, resume_step
                    )
            self._tensorboard = SummaryWriter(
                os.path.join(workdir, 'tensorboard'), purge_step=purge_step
            )
            self._jsonl = open(jsonl, 'a', encoding='utf-8')  # noqa: SIM115

    def write(self, step: int, scalars: dict[str, float], split: str | None = None) -> None:
        """One row: {'step': s, 'time': unix seconds, ...scalars} (eval rows carry 'split')."""
        if not self.active:
            return
        row = {
            'step': int(step),
            'time': round(time.time(), 3),
            **({'split': split} if split else {}),
        }
        row |= {name: float(value) for name, value in scalars.items()}
        self._jsonl.write(json.dumps(row) + '\n')
        self._jsonl.flush()
        prefix = f'{split}/' if split else 'train/'
        for name, value in scalars.items():
            self._tensorboard.add_scalar(prefix + name, float(value), int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        if self.active:
            self._tensorboard.close()
            self._jsonl.close()


class Progress:
    """Console bar: step, loss, learning rate, target tokens/s and ETA (process 0 only)."""

    def __init__(self, first_step: int, total_steps: int):
        self._bar = tqdm.tqdm(
            total=total_steps,
            initial=first_step,
            disable=jax.process_index() != 0,
            unit='step',
            dynamic_ncols=True,
        )
        self._time = time.perf_counter()

    def update(self, step: int) -> None:
        self._bar.update(step - self._bar.n)

    def report(self, scalars: dict[str, float], tokens: float) -> float:
        """Shows the latest scalars; returns target tokens/s since the last report."""
        now = time.perf_counter()
        tokens_per_s = tokens / max(now - self._time, 1e-9)
        self._time = now
        shown = {name: f'{value:.4g}' for name, value in scalars.items()}
        self._bar.set_postfix(shown | {'tok/s': f'{tokens_per_s:,.0f}'}, refresh=True)
        return tokens_per_s

    def close(self) -> None:
        self._bar.close()

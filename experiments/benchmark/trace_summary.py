"""Where a profiled step spends its time: the top operations of a jax.profiler trace.

    python experiments/benchmark/speed.py --config=... --what=train --profile_dir=/tmp/prof
    python experiments/benchmark/trace_summary.py /tmp/prof [--top=25]

Reads the newest `*.trace.json.gz` under the folder (Chrome trace format) and prints, for
each process of the trace (a GPU stream, the host), total time and the operations that take
most of it, as a share of that process's busy time.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import sys

from absl import app, flags

_TOP = flags.DEFINE_integer('top', 20, 'Operations listed per process.')


def load_events(folder: str) -> tuple[dict[int, str], list[dict]]:
    traces = sorted(pathlib.Path(folder).rglob('*.trace.json.gz'), key=lambda p: p.stat().st_mtime)
    if not traces:
        sys.exit(f'No *.trace.json.gz under {folder}: run speed.py with --profile_dir first.')
    with gzip.open(traces[-1], 'rt') as f:
        trace = json.load(f)
    events = trace['traceEvents'] if isinstance(trace, dict) else trace
    names = {
        e['pid']: e['args']['name']
        for e in events
        if e.get('ph') == 'M' and e.get('name') == 'process_name'
    }
    return names, [e for e in events if e.get('ph') == 'X' and 'dur' in e]


def summarize(names: dict[int, str], events: list[dict], top: int) -> str:
    by_process: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for event in events:
        by_process[event['pid']][event['name']] += event['dur']
    lines = []
    for pid, durations in sorted(by_process.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(durations.values())
        lines.append(f'\n{names.get(pid, pid)}: {total / 1e3:.1f} ms of events')
        for name, dur in durations.most_common(top):
            lines.append(f'  {100 * dur / total:5.1f}%  {dur / 1e3:9.2f} ms  {name[:90]}')
    return '\n'.join(lines)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError('usage: trace_summary.py PROFILE_DIR [--top=N]')
    print(summarize(*load_events(argv[1]), _TOP.value))  # noqa: T201 - the report


if __name__ == '__main__':
    app.run(main)

"""The metrics writer: rows logged past the resumed step are dropped, not duplicated."""

import json

from attn.training import metrics


def _rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _log(workdir, steps, resume_step=None) -> None:
    writer = metrics.MetricsWriter(str(workdir), resume_step=resume_step)
    for step in steps:
        writer.write(step, {'loss': float(step)})
        if step % 20 == 0:
            writer.write(step, {'loss': float(step)}, split='validation')
    writer.close()


def test_resume_drops_rows_past_the_restored_step(tmp_path):
    # Killed after logging step 50; the last checkpoint is step 40.
    _log(tmp_path, range(10, 60, 10))
    assert [row['step'] for row in _rows(tmp_path)] == [10, 20, 20, 30, 40, 40, 50]
    _log(tmp_path, range(50, 70, 10), resume_step=40)
    rows = _rows(tmp_path)
    assert [row['step'] for row in rows] == [10, 20, 20, 30, 40, 40, 50, 60, 60]
    assert [row.get('split') for row in rows if row['step'] == 40] == [None, 'validation']
    assert not list(tmp_path.glob('*.tmp'))


def test_fresh_run_drops_a_stale_file_and_a_cut_line(tmp_path):
    (tmp_path / 'metrics.jsonl').write_text(
        '{"step": 0, "loss": 1.0}\n{"step": 5, "loss": 2.0}\n{"st'
    )
    _log(tmp_path, [10], resume_step=0)
    assert [row['step'] for row in _rows(tmp_path)] == [0, 10]


def test_without_resume_step_nothing_is_dropped(tmp_path):
    _log(tmp_path, [10, 20])
    _log(tmp_path, [10])
    assert [row['step'] for row in _rows(tmp_path)] == [10, 20, 20, 10]


def test_a_line_that_lost_its_newline_is_not_joined_to_the_next(tmp_path):
    (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "loss": 1.0}')
    _log(tmp_path, [2], resume_step=1)
    assert [row['step'] for row in _rows(tmp_path)] == [1, 2]

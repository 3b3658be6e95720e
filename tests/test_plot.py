"""attn.plot: the curves written beside the plots are the metrics files' values, and the
legend names what differs between the runs' configs."""

import json
import pathlib
import subprocess
import sys

import pytest

from attn import plot
from attn.errors import UserError

ROOT = pathlib.Path(__file__).parents[1]
PNG = b'\x89PNG\r\n\x1a\n'
CONFIG = {'seed': 0, 'model': {'num_heads': 8, 'emb_dim': 64}, 'data': {'name': 'l10n'}}


def _rows(start: float, loss: float) -> list[dict]:
    """Training rows, a validation row and a BLEU row, as attn.train logs them."""
    return [
        {'step': 10, 'time': start, 'loss': loss, 'learning_rate': 1e-3},
        {'step': 20, 'time': start + 5.25, 'loss': loss - 1.5, 'learning_rate': 2e-3},
        {'step': 20, 'time': start + 7.5, 'split': 'validation', 'loss': 4.0, 'perplexity': 33.1},
        {'step': 20, 'time': start + 9.0, 'split': 'validation', 'bleu': 3.25},
    ]


def _workdir(path: pathlib.Path, rows: list[dict], config: dict) -> str:
    path.mkdir()
    (path / 'config.json').write_text(json.dumps(config))
    (path / 'metrics.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))
    return str(path)


@pytest.fixture
def runs(tmp_path):
    first = _workdir(tmp_path / 'base', _rows(1000.0, 6.0), CONFIG)
    other = json.loads(json.dumps(CONFIG))
    other['seed'], other['model']['num_heads'] = 1, 16
    second = _workdir(tmp_path / 'heads16', _rows(2000.5, 5.5), other)
    return [first, second]


def test_curves_json_holds_the_logged_values(runs, tmp_path):
    out = tmp_path / 'plots'
    plot.write(runs, str(out))
    written = json.loads((out / 'curves.json').read_text())['runs']
    assert [run['workdir'] for run in written] == runs
    for run, loss in zip(written, (6.0, 5.5), strict=True):  # wall from each run's start
        assert run['curves'] == {
            'train/loss': [[10, 0.0, loss], [20, 5.25, loss - 1.5]],
            'validation/perplexity': [[20, 7.5, 33.1]],
            'validation/bleu': [[20, 9.0, 3.25]],
        }
    for name in ('steps.png', 'wall.png'):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG)


def test_legend_names_the_config_differences(runs, tmp_path):
    written = plot.write(runs, str(tmp_path / 'plots'))
    assert [run['label'] for run in written] == ['base', 'heads16: model.num_heads=16, seed=1']


def test_label_lists_changed_added_and_removed_fields():
    config = {'seed': 0, 'model': {'num_heads': 8, 'remat': 'dots'}}
    reference = {'seed': 0, 'model': {'num_heads': 4}, 'steps': 5}
    changed = 'W2: model.num_heads=8, model.remat=dots, steps=(unset)'
    assert plot.label('W2', config, reference) == changed
    assert plot.label('W2', reference, reference) == 'W2: same config'
    assert plot.label('W2', None, reference) == 'W2'
    many = {f'f{i}': i for i in range(9)}
    assert plot.label('W3', many, {}).endswith('f5=5, +3 more')


def test_unreadable_line_is_skipped(tmp_path):
    workdir = _workdir(tmp_path / 'cut', _rows(0.0, 6.0), CONFIG)
    with open(f'{workdir}/metrics.jsonl', 'a', encoding='utf-8') as f:
        f.write('{"step": 30, "ti')  # cut short by a kill
    assert plot.read_metrics(workdir) == _rows(0.0, 6.0)


def test_missing_metrics_file_is_one_line_naming_it(runs, tmp_path):
    missing = tmp_path / 'empty'
    missing.mkdir()
    with pytest.raises(UserError, match='empty/metrics.jsonl does not exist'):
        plot.write([runs[0], str(missing)], str(tmp_path / 'plots'))
    flags = [f'--workdirs={runs[0]},{missing}', f'--out={tmp_path / "plots"}']
    result = subprocess.run(
        [sys.executable, '-m', 'attn.plot', *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'error: {missing}/metrics.jsonl does not exist: {missing} is not the workdir of a run.'
    ]


def test_table3_report_links_the_curves_of_its_finished_rows(tmp_path):
    from tests.test_launch import _finished_run, _report

    _finished_run(tmp_path / 'B1', 'row=B1,dataset=l10n', 21.5, 12.3)
    lines = _report(tmp_path)
    assert lines[-1] == '[Learning curves of the finished rows](curves/steps.png) (`curves/`).'
    runs = json.loads((tmp_path / 'curves' / 'curves.json').read_text())['runs']
    assert [run['curves'] for run in runs] == [{'train/loss': [[25, 0.0, 5.0], [600, 600.0, 3.0]]}]
    assert (tmp_path / 'curves' / 'steps.png').read_bytes().startswith(PNG)

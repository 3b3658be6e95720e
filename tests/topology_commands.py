"""Every command that reads a checkpoint, run on this process's devices, as one JSON object:

    python -m tests.topology_commands WORKDIR OUT

attn.evaluate (the test split, also averaged over the last 2 checkpoints), attn.translate
(the test sources), attn.analyze's attention maps, head importance and pruning curve,
and attn.average (the averaged parameters' sums), so a
test can compare them across device counts.
"""

import json
import sys

import jax
import numpy as np
from flax import nnx

from attn import average, rundir
from attn.analysis import heads, report
from attn.data import datasets
from attn.inference import evaluation, text


def run_all(workdir: str, out: str) -> dict:
    latest = evaluation.evaluate(workdir, split='test')
    averaged = evaluation.evaluate(workdir, split='test', average_last=2)
    run = rundir.load(workdir)
    data = datasets.load(run.config, ['test'])
    sources = [data.splits['test'][i]['en'].decode() for i in range(len(data.splits['test']))]
    translations = text.translate_lines(
        run, data.tokenizer, sources, batch_size=3, beam_size=4, alpha=0.6, max_input_tokens=32
    )
    batch = report.sentence_batch(data, run.config, 'test', 4)  # attn.analyze's numbers
    importance = heads.head_importance(run.model, batch, 'transformer')
    maps = heads.attention_maps(run.model, batch, 'transformer')
    curve = heads.pruning_curve(run.model, batch, 'transformer', importance, 3)
    written = average.average(workdir, last=2, out=f'{out}/average')
    params = rundir.load(written['out']).model
    sums = [
        float(np.asarray(x).astype(np.float64).sum())
        for x in jax.tree.leaves(nnx.state(params, nnx.Param))
    ]
    return {
        'devices': jax.device_count(),
        'evaluate': {k: latest[k] for k in ('perplexity', 'sacrebleu', 'samples')},
        'evaluate_average': {k: averaged[k] for k in ('perplexity', 'sacrebleu', 'samples')},
        'translate': list(translations),
        'analyze': {
            'pruning': curve,
            'attention': [float(np.asarray(w, np.float64).sum()) for w in maps.values()],
            'importance': [float(x) for v in importance.values() for x in np.asarray(v)],
        },
        'average': {'steps': written['steps'], 'sums': sums},
    }


if __name__ == '__main__':
    print(json.dumps(run_all(sys.argv[1], sys.argv[2])))  # noqa: T201

"""A trained checkpoint as a Hugging Face MarianMT directory and a CTranslate2 directory.

    python -m attn.export --workdir=W --out=D                  # D: transformers' MarianMTModel
    python -m attn.export --workdir=W --out=D --format=ct2 --quantization=int8
    python -m attn.export --workdir=W --out=D --format=both    # D/hf and D/ct2

The exported models compute attn's function up to float round-off (weights.py says how);
the search settings that Marian's generate and CTranslate2 cannot express are listed in
README.md (Export). Optional dependencies: pip install -e '.[export]' (torch, transformers,
safetensors, ctranslate2); nothing else in attn imports them. Needs W alone (the tokenizer is
W/tokenizer/), not the run's dataset.
"""

from __future__ import annotations

import os

from absl import flags
from flax import nnx

from attn import cli, rundir
from attn.data import tokenizer as tokenizer_lib
from attn.errors import UserError
from attn.export import ct2, hf
from attn.export.weights import ExportError, check_exportable, marian_tensors, vocabulary

FORMATS = ('hf', 'ct2', 'both')
QUANTIZATIONS = ('none', 'int8', 'int8_float16', 'float16')
__all__ = ['ExportError', 'export', 'run']


def export(
    run: rundir.Run,
    tokenizer: tokenizer_lib.Tokenizer,
    out: str,
    *,
    workdir: str,
    format: str = 'hf',  # noqa: A002 - the flag's name
    quantization: str = 'none',
) -> list[str]:
    """Writes `run`'s model as `format` under `out` (both: out/hf and out/ct2); returns the
    directories written. Everything is checked before anything is written."""
    check_exportable(run.config)
    if format not in FORMATS:
        raise ExportError(f'--format={format} is not one of {FORMATS}.')
    if quantization not in QUANTIZATIONS:
        raise ExportError(f'--quantization={quantization} is not one of {QUANTIZATIONS}.')
    if quantization != 'none' and format == 'hf':
        raise ExportError('--quantization applies to CTranslate2: use --format=ct2 or both.')
    check_out(out)
    pieces = vocabulary(tokenizer)
    targets = (
        {'hf': out, 'ct2': out} if format != 'both' else {'hf': f'{out}/hf', 'ct2': f'{out}/ct2'}
    )
    formats = ['hf', 'ct2'] if format == 'both' else [format]
    tensors = marian_tensors(nnx.to_pure_dict(nnx.state(run.model, nnx.Param)))
    if os.path.isdir(out):
        os.rmdir(out)  # empty: makedirs below recreates it
    for name in formats:
        if name == 'hf':
            hf.write_hf(run, tensors, tokenizer, targets['hf'], workdir)
        else:
            ct2.write_ct2(tensors, run.config, pieces, targets['ct2'], quantization)
    return [targets[name] for name in formats]


def check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f'--out={out} exists and is not empty; give a new directory.')


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    workdir = cli.workdir()
    if FLAGS.out is None:
        raise UserError('--out is required: the directory to write the exported model to.')
    check_out(FLAGS.out)
    # Refused before any weights are restored (export checks the rest again).
    config, steps = rundir.checkpoint_config(
        workdir, step=FLAGS.step, average_last=FLAGS.average_last
    )
    check_exportable(config)
    run = rundir.load(workdir, step=steps[-1], average_last=FLAGS.average_last)
    tokenizer = rundir.tokenizer(workdir, run.config)
    for directory in export(
        run,
        tokenizer,
        FLAGS.out,
        workdir=workdir,
        format=FLAGS.format,
        quantization=FLAGS.quantization,
    ):
        print(directory)  # noqa: T201 - the command's output


def run():
    flags.DEFINE_string('workdir', None, 'Workdir of a trained run.')
    flags.DEFINE_string('out', None, 'New directory to write (both: OUT/hf and OUT/ct2).')
    flags.DEFINE_enum('format', 'hf', FORMATS, 'hf: MarianMT; ct2: CTranslate2; both.')
    flags.DEFINE_enum('quantization', 'none', QUANTIZATIONS, 'CTranslate2 weight type.')
    cli.define_checkpoint_flags()
    cli.run(main)

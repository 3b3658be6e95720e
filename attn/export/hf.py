"""The Hugging Face directory: MarianMT config and weights, generation settings,
MarianTokenizer files and a model card. transformers, torch and safetensors are imported
only when writing."""

from __future__ import annotations

import json
import os
import shutil

from attn import rundir
from attn.data import tokenizer as tokenizer_lib
from attn.export.weights import MAX_POSITIONS, SPECIAL_PIECES, vocabulary
from attn.model.tokens import BOS_ID, EOS_ID, PAD_ID, UNK_ID


def generation_settings(config) -> dict:
    """attn's search as Marian's generate: beam, length penalty exponent, no early stop
    before the best is certain ('never', as attn's bound), PAD and BOS never produced,
    and one max length for all sentences (attn's is per sentence: source + extra)."""
    return dict(
        num_beams=config.decode.beam_size,
        length_penalty=config.decode.alpha,
        early_stopping='never',
        max_length=config.data.max_length + config.decode.max_extra_length,
        suppress_tokens=[PAD_ID, BOS_ID],
        decoder_start_token_id=BOS_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        forced_eos_token_id=None,
    )


def marian_config(config):
    """transformers.MarianConfig of an exportable attn config."""
    import transformers

    model = config.model
    return transformers.MarianConfig(
        vocab_size=model.vocab_size,
        decoder_vocab_size=model.vocab_size,
        d_model=model.emb_dim,
        encoder_layers=model.num_layers,
        decoder_layers=model.num_layers,
        encoder_attention_heads=model.num_heads,
        decoder_attention_heads=model.num_heads,
        encoder_ffn_dim=model.mlp_dim,
        decoder_ffn_dim=model.mlp_dim,
        activation_function='relu',
        dropout=model.dropout_rate,
        attention_dropout=model.attention_dropout_rate,
        activation_dropout=0.0,
        max_position_embeddings=MAX_POSITIONS,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        architectures=['MarianMTModel'],
        **{k: v for k, v in generation_settings(config).items() if k.endswith('token_id')},
    )


def write_tokenizer(tokenizer: tokenizer_lib.Tokenizer, config, out: str) -> None:
    """MarianTokenizer's files: the one SentencePiece model as source and target, and
    vocab.json mapping each piece to attn's id."""
    pieces = vocabulary(tokenizer)
    for name in ('source.spm', 'target.spm'):
        shutil.copyfile(str(tokenizer.path), os.path.join(out, name))
    _write_json(os.path.join(out, 'vocab.json'), {p: i for i, p in enumerate(pieces)})
    _write_json(
        os.path.join(out, 'tokenizer_config.json'),
        {
            'tokenizer_class': 'MarianTokenizer',
            'source_lang': config.data.source_lang,
            'target_lang': config.data.target_lang,
            'unk_token': SPECIAL_PIECES[UNK_ID],
            'eos_token': SPECIAL_PIECES[EOS_ID],
            'pad_token': SPECIAL_PIECES[PAD_ID],
            'model_max_length': MAX_POSITIONS,
            'separate_vocabs': False,
        },
    )


def write_hf(run: rundir.Run, tensors: dict, tokenizer, out: str, workdir: str) -> None:
    """D/config.json, generation_config.json, model.safetensors, tokenizer files, README.md."""
    import safetensors.numpy
    import transformers

    os.makedirs(out)
    marian_config(run.config).save_pretrained(out)
    transformers.GenerationConfig(**generation_settings(run.config)).save_pretrained(out)
    safetensors.numpy.save_file(
        tensors, os.path.join(out, 'model.safetensors'), metadata={'format': 'pt'}
    )
    write_tokenizer(tokenizer, run.config, out)
    with open(os.path.join(out, 'README.md'), 'w', encoding='utf-8') as f:
        f.write(model_card(run, workdir))


def _write_json(path: str, value) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(value, f, indent=1, ensure_ascii=False)


# ---------------------------------------------------------------------------- model card


def checkpoint_scores(workdir: str, step: int, config) -> dict:
    """The validation perplexity logged at `step` (W/metrics.jsonl) and the test report of
    `step` with the config's own search (`rundir.read_report`), where the workdir has them."""
    scores = {}
    metrics = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(metrics):
        with open(metrics, encoding='utf-8') as f:
            for line in f:
                row = json.loads(line)
                if row.get('step') == step and 'perplexity' in row:
                    scores[f'{row["split"]} perplexity'] = round(row['perplexity'], 2)
    test = rundir.read_report(workdir, 'test', step, config)
    if test is not None:
        scores['test perplexity'] = round(test['perplexity'], 2)
        if 'sacrebleu' in test:
            scores['test sacreBLEU'] = round(test['sacrebleu']['bleu'], 2)
            scores['test BLEU (paper-style)'] = round(test['paper_bleu']['bleu'], 2)
    return scores


def model_card(run: rundir.Run, workdir: str) -> str:
    """README.md of the Hugging Face directory: data, model, steps, scores, usage."""
    config, data = run.config, run.config.data
    scores = checkpoint_scores(workdir, run.step, config)
    scores = scores or {'scores': 'none recorded in the workdir'}
    steps = f'{run.step}' + (f' (mean of checkpoints {run.steps})' if len(run.steps) > 1 else '')
    model = ', '.join(f'{k}={v}' for k, v in config.model.items())
    lines = [
        f'# attn Transformer, {data.source_lang}->{data.target_lang}',
        '',
        'The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), trained with',
        'attn and exported by `python -m attn.export` as a MarianMT model that computes the',
        'same function (weights rewritten: Marian coordinate order, LayerNorm epsilon).',
        '',
        f'- data: {data.name} ({data.config}), SentencePiece vocabulary of {data.vocab_size}',
        f'- model: {model}',
        f'- training steps: {steps}',
        *[f'- {name}: {value}' for name, value in scores.items()],
        f'- search: beam {config.decode.beam_size}, length penalty {config.decode.alpha} '
        '(attn: ((5+|Y|)/6)^alpha; generate: |Y|^alpha), max length source + '
        f'{config.decode.max_extra_length} in attn, {generation_settings(config)["max_length"]}'
        ' here',
        '',
        '```python',
        'from transformers import MarianMTModel, MarianTokenizer',
        "tokenizer = MarianTokenizer.from_pretrained('.')",
        "model = MarianMTModel.from_pretrained('.')",
        "batch = tokenizer(['Choose Format - Cells.'], return_tensors='pt', padding=True)",
        'print(tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True))',
        '```',
        '',
        'The position tables are stored in model.safetensors (scaled with the weights):',
        'load this directory with from_pretrained, do not rebuild the model from its config.',
        '',
    ]
    return '\n'.join(lines)

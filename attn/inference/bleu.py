"""BLEU two ways: sacreBLEU on detokenized text (the headline figure), and the paper's
tokenized BLEU with compound splitting (for comparison with Table 2).

Paper-style: hypotheses and references are tokenized with the Moses tokenizer
(sacremoses, escaping off), hyphenated compounds are split as in tensor2tensor's
get_ende_bleu.sh (`a-b` -> `a ##AT##-##AT## b`), and BLEU is taken over those tokens
(sacreBLEU with tokenize='none', i.e. multi-bleu.perl's counting). It reads ~0.7-1
BLEU above sacreBLEU on the same output.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import sacrebleu
from sacremoses import MosesTokenizer

_COMPOUND = re.compile(r'(\S)-(\S)')


def sacre_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Detokenized, case-sensitive corpus BLEU with sacreBLEU's default 13a tokenizer."""
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {'bleu': score.score, 'signature': str(metric.get_signature())}


@functools.cache
def _moses(lang: str) -> MosesTokenizer:
    return MosesTokenizer(lang=lang)


def paper_tokenize(text: str, lang: str) -> str:
    r"""Moses tokenization, then one pass of compound splitting, exactly as the perl
    one-liner s{(\S)-(\S)}{$1 ##AT##-##AT## $2}g does (so a-b-c keeps its second hyphen)."""
    tokens = _moses(lang).tokenize(text, return_str=True, escape=False)
    return _COMPOUND.sub(r'\1 ##AT##-##AT## \2', tokens)


def paper_bleu(hypotheses: Sequence[str], references: Sequence[str], lang: str) -> dict:
    """Tokenized BLEU with compound splitting, as the paper reports."""
    hyps = [paper_tokenize(h, lang) for h in hypotheses]
    refs = [paper_tokenize(r, lang) for r in references]
    score = sacrebleu.metrics.BLEU(tokenize='none', force=True).corpus_score(hyps, [refs])
    return {
        'bleu': score.score,
        'method': f'sacremoses({lang}) + compound splitting (##AT##) + BLEU over tokens',
    }

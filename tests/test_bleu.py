"""BLEU: identical text scores 100; the paper-style variant tokenizes and splits compounds."""

import pytest

from attn.inference import bleu


def test_identical_text_scores_100():
    text = [
        'Wählen Sie Format - Zellen.',
        'Der Kurswert liegt bei 97, der Rückzahlungswert bei 100.',
    ]
    assert bleu.sacre_bleu(text, text)['bleu'] == pytest.approx(100.0)
    assert bleu.paper_bleu(text, text, 'de')['bleu'] == pytest.approx(100.0)
    assert 'tok:13a' in bleu.sacre_bleu(text, text)['signature']


def test_disjoint_text_scores_0():
    assert bleu.sacre_bleu(['eins zwei drei vier'], ['fünf sechs sieben acht'])['bleu'] == 0.0


def test_paper_tokenization_splits_compounds_and_punctuation():
    assert bleu.paper_tokenize('Kfz-Einbruchsdiebstahl, z.B. heute.', 'de') == (
        'Kfz ##AT##-##AT## Einbruchsdiebstahl , z.B. heute .'
    )
    assert bleu.paper_tokenize('a-b-c', 'en') == 'a ##AT##-##AT## b-c'  # as the perl one-liner

"""Datasets (TFDS builders), the shared SentencePiece tokenizer and the Grain input pipeline."""

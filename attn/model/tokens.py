"""Special token ids, shared by the tokenizer, the input pipeline, the model and decoding.

The SentencePiece model is trained with exactly these ids (data/tokenizer.py), so every
vocabulary starts with them.
"""

PAD_ID = 0  # padding (segment 0 of packed rows); never attended to, never decoded
UNK_ID = 1  # unknown piece (rare: the tokenizer falls back to bytes)
BOS_ID = 2  # starts every decoder input (`shift_right`)
EOS_ID = 3  # ends every example and every decoded output
NUM_SPECIAL_TOKENS = 4  # ids below this are the four above

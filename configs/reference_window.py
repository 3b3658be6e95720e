"""The reference-window study: how far back can each model recall a token?

    python -m experiments.reference_window.study --config=configs/reference_window.py \
        --out=runs/reference_window

Trains a decoder-only Transformer (attn.model.LanguageModel) and a vanilla RNN, a GRU and
an LSTM with matched parameter counts, on the same examples with the same optimizer and
step budget, then scores each at distances k = 1, 2, 4, ... max_k. `:kind=offset` (default)
asks for the token k back with nothing marking it in advance; `:kind=marker` marks it (see
experiments/reference_window/task.py). `:size=tiny` is the test's few-second version;
`:max_k=512,steps=4000` a GPU-sized one. Measured on CPU: docs/results.md, "Reference
window".
"""

from ml_collections import config_dict

from attn import configs


def get_config(arg=None):
    arg = configs.parse_arg(arg, size='small', kind='offset', max_k=64, steps=2000)
    configs.check_choice('size', arg.size, ('tiny', 'small'))
    tiny = arg.size == 'tiny'
    config = config_dict.ConfigDict()
    config.seed = 0
    config.task = config_dict.ConfigDict()
    config.task.kind = arg.kind  # checked by the study against the task's kinds
    config.task.content_tokens = 18
    config.task.max_k = 8 if tiny else arg.max_k
    config.eval_examples_per_k = 16 if tiny else 256
    # The Transformer (its vocabulary and length are the task's); the recurrent models get
    # the same embedding width and whatever hidden size brings their parameter count
    # nearest to its.
    config.model = configs.model_fields('tiny')
    config.model.update(num_layers=2, emb_dim=64, mlp_dim=256, num_heads=4, dropout_rate=0.0)
    config.models = ('transformer', 'rnn', 'gru', 'lstm')
    config.steps = 4 if tiny else arg.steps
    config.batch_size = 8 if tiny else 64
    config.learning_rate = 1e-3  # Adam, linear warmup then constant
    config.warmup_steps = 2 if tiny else 100
    config.grad_clip_norm = 1.0  # recurrent models need it; applied to all alike
    config.lock()
    return config

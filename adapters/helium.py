"""helium: the Model always builds lm_head, but a tied config projects with embed_tokens."""

import mlx.nn as nn

from ppwrap._adapter import Adapter, register_adapter


def _tied(model: nn.Module) -> bool:
    return bool(model.args.tie_word_embeddings)


register_adapter(Adapter(model_type="helium", tied=_tied))

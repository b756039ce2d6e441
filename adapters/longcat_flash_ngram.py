"""longcat_flash_ngram: the input embedding is an n-gram embedding module."""

from ppwrap._adapter import Adapter, register_adapter

register_adapter(Adapter(model_type="longcat_flash_ngram", embedding="ngram_embeddings"))

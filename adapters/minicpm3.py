"""minicpm3: as minicpm, an untied head sees the hidden states divided by hidden_size / dim_model_base."""

from ppwrap._adapter import Adapter, register_adapter

from .minicpm import project

register_adapter(Adapter(model_type="minicpm3", project=project))

"""gemma4: its text model splits as gemma4_text does; logits tanh soft-capped by final_logit_softcapping (when set)."""

from ppwrap._adapter import Adapter, register_adapter
from ppwrap.transforms import softcap

from .gemma4_text import SHARED, per_layer_inputs

register_adapter(
    Adapter(
        model_type="gemma4",
        shared_kv=SHARED,
        embedding_everywhere=per_layer_inputs,
        transform=softcap("final_logit_softcapping"),
        traffic=(
            "the new keys and values of each source layer read after the boundary (as gemma4_text)"
        ),
    )
)

"""gemma4: logits tanh soft-capped by final_logit_softcapping (when set)."""

from ppwrap._adapter import Adapter, register_adapter
from ppwrap.transforms import softcap

UNSPLITTABLE = (
    "its layers hand shared keys and values on to later layers, which another rank would hold."
)

register_adapter(
    Adapter(
        model_type="gemma4", unsplittable=UNSPLITTABLE, transform=softcap("final_logit_softcapping")
    )
)

"""gemma3n: the language model applies its tied head and soft-capping after its final norm."""

from ppwrap._adapter import Adapter, register_adapter, stop_after
from ppwrap.transforms import softcap

UNSPLITTABLE = "its KV-sharing layers attend with the keys and values of earlier layers, which another rank would hold."

register_adapter(
    Adapter(
        model_type="gemma3n",
        unsplittable=UNSPLITTABLE,
        text_model="model.language_model",
        # The language model is its own backbone: stop it once its norm returns.
        backbone="",
        call_backbone=stop_after("norm"),
        transform=softcap("final_logit_softcapping"),
    )
)

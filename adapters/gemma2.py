"""gemma2: logits tanh soft-capped by final_logit_softcapping (when set)."""

from ppwrap._adapter import Adapter, register_adapter
from ppwrap.transforms import softcap

register_adapter(Adapter(model_type="gemma2", transform=softcap("final_logit_softcapping")))

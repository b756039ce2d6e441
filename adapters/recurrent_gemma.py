"""recurrent_gemma: logits tanh soft-capped by the config's logits_soft_cap."""

from ppwrap._adapter import Adapter, register_adapter
from ppwrap.transforms import softcap

register_adapter(Adapter(model_type="recurrent_gemma", transform=softcap("args.logits_soft_cap")))

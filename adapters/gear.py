"""gear: logits tanh soft-capped when the config sets final_logit_softcapping."""

from ppwrap._adapter import Adapter, register_adapter
from ppwrap.transforms import softcap

register_adapter(Adapter(model_type="gear", transform=softcap("args.final_logit_softcapping")))

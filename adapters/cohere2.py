"""cohere2: tied head, logits scaled by the config's logit_scale."""

from ppwrap._adapter import Adapter, register_adapter
from ppwrap.transforms import multiply

register_adapter(Adapter(model_type="cohere2", transform=multiply("model.args.logit_scale")))

"""granitemoehybrid: logits divided by the config's logits_scaling after the head."""

from ppwrap._adapter import Adapter, register_adapter
from ppwrap.transforms import divide

register_adapter(Adapter(model_type="granitemoehybrid", transform=divide("logits_scaling")))

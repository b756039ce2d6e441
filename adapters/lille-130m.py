"""lille-130m: the backbone applies the tied head after its final norm."""

from ppwrap._adapter import Adapter, register_adapter, stop_after

register_adapter(Adapter(model_type="lille-130m", call_backbone=stop_after("norm")))

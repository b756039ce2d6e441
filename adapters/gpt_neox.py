"""gpt_neox: the backbone applies the head (embed_out) after its final norm."""

from ppwrap._adapter import Adapter, register_adapter, stop_after

register_adapter(
    Adapter(
        model_type="gpt_neox",
        head="model.embed_out",
        call_backbone=stop_after("final_layer_norm"),
    )
)

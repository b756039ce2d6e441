"""olmo: backbone at model.transformer, which applies the untied head (ff_out) after its norm."""

from ppwrap._adapter import Adapter, register_adapter, stop_after

register_adapter(
    Adapter(
        model_type="olmo",
        backbone="model.transformer",
        head="model.transformer.ff_out",
        call_backbone=stop_after("norm"),
        unsupported=(
            "mlx-lm's olmo module exits on import unless the torch-based ai2-olmo "
            "package is installed, and its attention adds the string mask 'causal' "
            "to the scores for any prompt longer than one token."
        ),
    )
)

"""muse_glimmer: logits multiplied by output_multiplier, then tanh soft-capped."""

from ppwrap._adapter import Adapter, register_adapter
from ppwrap.transforms import chain, multiply, softcap

register_adapter(
    Adapter(
        model_type="muse_glimmer",
        transform=chain(
            multiply("args.output_multiplier"), softcap("args.final_logit_softcapping")
        ),
    )
)

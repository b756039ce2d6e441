"""kimi_k3: generic parts; ppwrap.pipeline cannot split it."""

from ppwrap._adapter import Adapter, register_adapter

register_adapter(
    Adapter(
        model_type="kimi_k3",
        unsplittable=("its layers pass attention-residual blocks along with the hidden state."),
    )
)

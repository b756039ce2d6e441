"""nanbeige: generic parts; ppwrap.pipeline cannot split it."""

from ppwrap._adapter import Adapter, register_adapter

register_adapter(
    Adapter(
        model_type="nanbeige",
        unsplittable=(
            "it runs its layer stack several times per token (num_loops), so no contiguous slice of layers is a stage."
        ),
    )
)

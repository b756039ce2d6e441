"""deepseek_v41: generic parts; ppwrap.pipeline cannot split it."""

from ppwrap._adapter import Adapter, register_adapter

register_adapter(
    Adapter(
        model_type="deepseek_v41",
        unsplittable=(
            "its layers pass several residual streams and mixing weights, not one hidden state; use mlx-lm's own pipeline() (PipelineMixin), which PipelineHead wraps."
        ),
    )
)

"""nanbeige: the layer stack runs num_loops times per token; the hidden state goes round the ranks once per run."""

from ppwrap._adapter import Adapter, register_adapter

register_adapter(
    Adapter(
        model_type="nanbeige",
        # Each run has its own caches; between runs the backbone norms the hidden
        # state, and the final rank hands the normed state to the first stage.
        loops="num_loops",
        traffic=(
            "the hidden state again in each further loop (num_loops messages per "
            "boundary), and once from the final rank to the first stage between loops"
        ),
    )
)

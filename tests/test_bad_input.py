"""Bad input gets a clear error, raised before any communication starts."""

import json

import mlx.core as mx
import pytest

import ppwrap
from ppwrap import PipelineHead

from families import build, write_model_folder


@pytest.fixture(scope="module")
def llama():
    return PipelineHead.wrap(build("llama"))


@pytest.mark.parametrize(
    "inputs,message",
    [
        (mx.array([1, 2, 3]), r"shape \(batch, length\); got shape \(3,\)"),
        (mx.array([[1.0, 2.0]]), "integer token ids; got dtype"),
    ],
)
def test_wrapped_call_rejects_inputs_of_the_wrong_shape_or_dtype(llama, inputs, message):
    with pytest.raises(ValueError, match=message):
        llama(inputs)


def test_wrapped_call_rejects_a_list_of_ids(llama):
    with pytest.raises(TypeError, match="mx.array of token ids"):
        llama([[1, 2]])


def test_generate_step_rejects_ids_outside_the_vocabulary(llama):
    with pytest.raises(ValueError, match=r"token ids from 1 to 500, outside .* 0\.\.127"):
        next(ppwrap.generate_step(mx.array([1, 500]), llama))


def test_generate_step_rejects_an_empty_prompt(llama):
    with pytest.raises(ValueError, match="non-empty 1-D array"):
        next(ppwrap.generate_step(mx.array([], dtype=mx.int32), llama))


def test_generation_functions_reject_a_bare_model():
    with pytest.raises(TypeError, match="takes a PipelineHead"):
        next(ppwrap.generate_step(mx.array([1]), build("llama")))


def test_wrapping_twice_is_an_error(llama):
    with pytest.raises(TypeError, match="got a PipelineHead"):
        PipelineHead.wrap(llama)


def test_a_module_with_no_backbone_names_what_was_looked_for():
    import mlx.nn as nn

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(2, 2)

    with pytest.raises(
        ValueError,
        match=r"cannot find the backbone.*'model', 'transformer'.*\['trunk'\].*register_adapter",
    ):
        PipelineHead.wrap(Odd())


def test_load_of_a_folder_without_config_says_it_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ppwrap.load(tmp_path)


def test_load_of_a_folder_missing_layer_weights_names_them(tmp_path):
    folder = write_model_folder("llama", tmp_path / "llama")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weights = mx.load(str(folder / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if not k.startswith("model.layers.3.")}
    mx.save_safetensors(str(folder / "model.safetensors"), kept)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in kept}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="layers.3"):
        ppwrap.load(folder)


def test_generate_step_rejects_an_unknown_wait_mode(llama):
    with pytest.raises(
        ValueError, match=r"wait must be one of \['auto', 'spin', 'sleep', 'wake'\]"
    ):
        next(ppwrap.generate_step(mx.array([1, 2]), llama, wait="nap"))


def test_nan_in_the_first_logits_is_an_error_naming_the_likely_causes():
    model = build("llama")
    model.model.norm.weight = mx.full(model.model.norm.weight.shape, float("nan"))
    head = PipelineHead.wrap(model)
    with pytest.raises(ppwrap.NonFiniteLogitsError, match="hold NaN or \\+inf"):
        for _ in ppwrap.generate_step(mx.array([1, 2, 3]), head, max_tokens=4):
            pass


def test_finite_logits_with_masked_tokens_generate_as_usual():
    # -inf from a logits processor is a choice, not a fault: only the model's
    # own logits are checked, before the processors.
    def ban_token_0(tokens, logits):
        return logits.at[:, 0].add(-float("inf"))

    head = PipelineHead.wrap(build("llama"))
    steps = list(
        ppwrap.generate_step(
            mx.array([1, 2, 3]), head, max_tokens=4, logits_processors=[ban_token_0]
        )
    )
    assert len(steps) == 4 and all(token != 0 for token, _ in steps)


def test_load_keeps_the_checkpoint_folder_it_resolved(tmp_path):
    folder = write_model_folder("llama", tmp_path / "llama")
    head, _ = ppwrap.load(str(folder))
    assert head.path == folder

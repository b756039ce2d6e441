"""The adapter registry: decorator and Adapter forms, duplicates, entry points."""

import logging
from importlib import metadata

import pytest

import ppwrap
from ppwrap import Adapter, find_adapter, register_adapter
from ppwrap import _adapter as registry

from families import build


@pytest.fixture
def clean_registry(monkeypatch):
    registry._load_builtin()  # registered for good before the copy is taken
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)


def test_decorator_form_registers_the_function_as_the_transform(clean_registry):
    @register_adapter("decorated_family", backbone="body")
    def double(model, logits):
        return logits * 2

    adapter = registry.adapter_for("decorated_family")
    assert adapter == Adapter(model_type="decorated_family", backbone="body", transform=double)


def test_duplicate_registration_names_both_and_override_replaces(clean_registry):
    register_adapter(Adapter(model_type="dup_family"))
    with pytest.raises(
        ValueError, match=r"already registered \(from test_adapter\).*override=True"
    ):
        register_adapter(Adapter(model_type="dup_family", head="out"))
    register_adapter(Adapter(model_type="dup_family", head="out"), override=True)
    assert registry.adapter_for("dup_family").head == "out"


def test_adapter_form_takes_no_extra_fields():
    with pytest.raises(TypeError, match="takes no other fields"):
        register_adapter(Adapter(model_type="x"), backbone="y")


def test_find_adapter_gives_the_registered_one_or_a_generic_one_named_after_the_family():
    assert find_adapter(build("gemma2")) is registry.adapter_for("gemma2")
    assert find_adapter(build("llama")) == Adapter(model_type="llama")


class FakeEntryPoint:
    def __init__(self, name, load):
        self.name, self.load = name, load


def test_entry_points_load_once_count_and_skip_a_broken_one(clean_registry, monkeypatch, caplog):
    def good():
        register_adapter(Adapter(model_type="plugin_family", backbone="trunk"))

    def broken():
        raise ImportError("no such module")

    points = [FakeEntryPoint("good", good), FakeEntryPoint("broken", broken)]
    monkeypatch.setattr(
        metadata, "entry_points", lambda group: points if group == "ppwrap.adapters" else []
    )
    with caplog.at_level(logging.ERROR, logger="ppwrap"):
        assert ppwrap.load_entry_points() == 1
    assert "'broken'" in caplog.text
    assert registry.adapter_for("plugin_family").backbone == "trunk"
    assert ppwrap.load_entry_points() == 0  # idempotent


def test_registered_adapters_lists_builtin_ones_sorted():
    names = list(ppwrap.registered_adapters())
    assert names == sorted(names)
    assert {"gemma2", "cohere", "gpt_neox", "talkie"} <= set(names)


def test_logits_processors_apply_on_the_final_rank_as_in_mlx_lm(tmp_path):
    from mlx_lm import stream_generate as mlx_stream_generate
    from mlx_lm.sample_utils import make_logits_processors

    from families import write_model_folder

    folder = write_model_folder("llama", tmp_path / "llama")
    head, tok = ppwrap.load(folder)
    model, _ = __import__("mlx_lm").load(str(folder))
    procs = make_logits_processors(logit_bias={7: 1000.0})
    ours = [
        r.token
        for r in ppwrap.stream_generate(
            head, tok, "The quick", max_tokens=12, logits_processors=procs
        )
    ]
    ref = [
        r.token
        for r in mlx_stream_generate(
            model, tok, "The quick", max_tokens=12, logits_processors=procs
        )
    ]
    plain = [r.token for r in ppwrap.stream_generate(head, tok, "The quick", max_tokens=12)]
    assert ours == ref
    assert ours == [7] * 12 != plain  # the bias decided every token


def test_a_model_without_a_head_raises_unsupported_model_error_naming_what_it_looked_for():
    import mlx.nn as nn

    from ppwrap import Adapter, PipelineHead, UnsupportedModelError

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(4, 4)]

    class Model(nn.Module):
        model_type = "headless_test_family"

        def __init__(self):
            super().__init__()
            self.model = Backbone()

    with pytest.raises(UnsupportedModelError, match="cannot find the output head") as raised:
        PipelineHead.wrap(Model(), adapter=Adapter(model_type="headless_test_family"))
    assert isinstance(raised.value, ValueError)

"""ppwrap.load keeps one record of the checkpoint: its folder and its config."""

import json

import ppwrap

from families import write_model_folder


def test_load_keeps_the_folder_and_config_that_vocab_size_and_serve_read(tmp_path):
    folder = write_model_folder("llama", tmp_path / "llama", max_position_embeddings=512)
    head, _ = ppwrap.load(str(folder))
    config = json.loads((folder / "config.json").read_text())
    assert head.path == folder
    assert head.config is not None and head.config["model_type"] == "llama"
    assert head.vocab_size == config["vocab_size"]
    from ppwrap.serve.app import context_length

    assert context_length(head.config) == 512

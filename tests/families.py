"""Tiny random-weight models of real mlx-lm families, for the tests.

Each family has a tiny config in ``tests/configs/<family>.json``, written like
the ``config.json`` of a real checkpoint, so the same file builds a model here
and a checkpoint folder in the loading tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.models
from mlx.utils import tree_map

from ppwrap._support import installed_families, pipeline_mixin_families  # noqa: F401

CONFIGS = Path(__file__).parent / "configs"
MODELS_DIR = Path(mlx_lm.models.__file__).parent


def tiny_config(family: str, **overrides: Any) -> dict[str, Any]:
    path = CONFIGS / f"{family}.json"
    config: dict[str, Any] = json.loads(path.read_text())
    config.update(overrides)
    return config


def build(family: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random-weight model of ``family``, the same on every call and rank."""
    from mlx_lm.utils import _get_classes

    config = tiny_config(family, **overrides)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Some families start a weight at zero (talkie's head); random values make
    # every comparison meaningful.
    model.update(tree_map(_unzero, model.parameters()))
    mx.eval(model.parameters())
    return model


# More tiny configs for families whose layers differ from one another: block-sparse
# or dense attention, sliding or global windows, attention or recurrent layers. Each
# moves the per-layer pattern so that other kinds of layers meet at a stage boundary.
# {family: {name: overrides of tests/configs/<family>.json}}; the decomposition and
# single-process split tests run each one besides the family's own config.
GLOBAL_FIRST = ["full_attention"] + ["sliding_attention"] * 3
FULL_MIDDLE = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]

VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "phi3small": {
        # Issue #21: 1000 tokens, below the dummy token ids (100256 and up) it masks.
        "h128-v1000": {
            "num_hidden_layers": 4,
            "dense_attention_every_n_layers": 2,
            "hidden_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1000,
        },
    },
    "gemma3_text": {
        # Global on layer 2 only; a window shorter than a prefill chunk.
        "global-3rd-window-2": {"sliding_window_pattern": 3, "sliding_window": 2},
    },
    # Issue #21's families, whose boundaries carry more than the hidden state:
    # other group sizes, loops, sharing and compression patterns.
    "hunyuan": {"cla-groups-of-3": {"cla_share_factor": 3}},
    "kimi_k3": {
        "blocks-of-3": {
            "text_config": {**tiny_config("kimi_k3")["text_config"], "attn_res_block_size": 3}
        }
    },
    "nanbeige": {"3-loops-one-norm": {"num_loops": 3, "skip_loop_final_norm": True}},
    "iquestloopcoder": {"window-2": {"loop_window_size": 2}},
    "gemma4_text": {"1-shared": {"num_kv_shared_layers": 1}},
    "afm7": {"3-reuse-layers": {"num_kv_reuse_layers": 3}},
    "deepseek_v41": {
        "compress-first": {
            "text_config": {
                **tiny_config("deepseek_v41")["text_config"],
                "compress_ratios": [2, 1, 0, 2],
                "kv_source_layer_ids": [0, 1],
                "index_source_layer_ids": [0, 3],
                "candidate_source_layer_id": 0,
            }
        }
    },
    "granitemoehybrid": {
        # Attention on both sides of the split; the last rank builds the attention
        # mask from the cache of a layer it does not run.
        "attention-ends": {"layer_types": ["attention", "mamba", "mamba", "attention"]},
    },
    # The other families whose layers differ: windows, layer kinds and dense or
    # expert MLPs moved so that other kinds of layers meet at the stage boundaries.
    "Klear": {
        # Dense MLPs on the odd layers: each boundary has experts on one side only.
        "dense-odd": {"mlp_only_layers": [1, 3]},
    },
    "afmoe": {
        # Global attention on the even layers; the middle rank of three has none.
        "global-even-2-dense": {
            "layer_types": [
                "full_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
            ],
            "num_dense_layers": 2,
        },
    },
    "baichuan_m1": {
        # Sliding windows on the first two layers only: the last rank has none.
        "sliding-first-2": {"sliding_window_layers": [0, 1]},
    },
    "bailing_hybrid": {
        # Groups of 3: MLA on layers 2 and 5 only; the first rank of three has none.
        "groups-of-3": {"layer_group_size": 3, "first_k_dense_replace": 2},
    },
    "bailing_moe_linear": {
        # Groups of 3: linear attention on layers 0-1, softmax attention on 2-3.
        "groups-of-3": {"layer_group_size": 3, "first_k_dense_replace": 2},
    },
    "bailing_moe_v3": {
        # Groups of 3: linear attention on layers 0-1, MLA on 2-3.
        "groups-of-3": {"layer_group_size": 3, "first_k_dense_replace": 2},
    },
    "cohere2": {
        # Global on the odd layers (every 2nd) instead of the last of 4.
        "global-odd": {"sliding_window_pattern": 2},
    },
    "deepseek_v3": {
        # Experts on the even layers (every 2nd from layer 0), dense MLPs on the odd.
        "experts-even": {"first_k_dense_replace": 0, "moe_layer_freq": 2},
    },
    "ernie4_5_moe": {
        # Experts on the odd layers (every 2nd) instead of layers 1-3.
        "experts-odd": {"moe_layer_start_index": 0, "moe_layer_interval": 2},
    },
    "exaone4": {
        # Global on layer 1 only: the last rank's layers all slide.
        "global-2nd": {"sliding_window_pattern": "LGLL"},
    },
    "exaone_moe": {
        # Global on layer 1 only; dense MLPs on the odd layers.
        "global-2nd-dense-odd": {
            "layer_types": [
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention",
            ],
            "is_moe_layer": [True, False, True, False],
        },
    },
    "gear": {
        # Attention first, convolutions on the odd layers: each stage starts differently.
        "attention-even": {
            "layer_types": [
                "sliding_attention",
                "conv_mixer",
                "full_attention",
                "conv_mixer",
            ]
        },
    },
    "gemma3": {
        # Global on layer 2 only; a window shorter than a prefill chunk.
        "global-3rd-window-2": {
            "text_config": {
                **tiny_config("gemma3")["text_config"],
                "sliding_window_pattern": 3,
                "sliding_window": 2,
            }
        },
    },
    "gemma3n": {
        # Full attention first; one KV-shared layer, reading a sliding source.
        "full-even-1-shared": {
            "text_config": {
                **tiny_config("gemma3n")["text_config"],
                "layer_types": [
                    "full_attention",
                    "sliding_attention",
                    "full_attention",
                    "sliding_attention",
                ],
                "num_kv_shared_layers": 1,
            }
        },
    },
    "gemma4": {
        # Full attention at the ends: the shared layers read the other kind's source.
        "full-ends": {
            "text_config": {
                **tiny_config("gemma4")["text_config"],
                "layer_types": [
                    "full_attention",
                    "sliding_attention",
                    "sliding_attention",
                    "full_attention",
                ],
            }
        },
    },
    "gpt_oss": {
        # Global attention on layer 0 only: the last rank's layers all slide.
        "global-first": {"layer_types": GLOBAL_FIRST},
    },
    "jamba": {
        # Attention on the odd layers, experts on the even ones.
        "attention-odd-experts-even": {
            "attn_layer_offset": 1,
            "attn_layer_period": 2,
            "expert_layer_offset": 0,
        },
    },
    "kimi_linear": {
        # Full attention on layers 0-1, linear attention (KDA) on 2-3; two dense.
        "full-first-2": {
            "linear_attn_config": {
                **tiny_config("kimi_linear")["linear_attn_config"],
                "full_attn_layers": [1, 2],
                "kda_layers": [3, 4],
            },
            "first_k_dense_replace": 2,
        },
    },
    "laguna": {
        # Full attention in the middle, sliding at the ends; experts on layer 2 only.
        "full-middle": {
            "layer_types": FULL_MIDDLE,
            "num_attention_heads_per_layer": [6, 4, 4, 6],
            "mlp_layer_types": ["dense", "dense", "sparse", "dense"],
        },
    },
    "lfm2": {
        # Attention at both ends, convolutions in the middle.
        "attention-ends": {
            "layer_types": ["full_attention", "conv", "conv", "full_attention"],
            "full_attn_idxs": [0, 3],
        },
    },
    "lfm2-vl": {
        # Attention on layer 0 only: the later ranks run convolutions alone.
        "attention-first": {
            "text_config": {
                **tiny_config("lfm2-vl")["text_config"],
                "layer_types": ["full_attention", "conv", "conv", "conv"],
            }
        },
    },
    "lfm2_moe": {
        # Attention on the last two layers; dense MLPs on the first two.
        "attention-last-2": {
            "layer_types": ["conv", "conv", "full_attention", "full_attention"],
            "num_dense_layers": 2,
        },
    },
    "llama4": {
        # 6 layers: the global NoPE layer (3) opens a stage, and the last rank of
        # three has chunked attention only; chunks of 2.
        "6-layers-chunk-2": {
            "text_config": {
                **tiny_config("llama4")["text_config"],
                "num_hidden_layers": 6,
                "attention_chunk_size": 2,
            }
        },
    },
    "llama4_text": {
        # NoPE on layer 1 instead of layer 3.
        "nope-2nd": {"no_rope_layers": [1, 0, 1, 1]},
    },
    "mellum": {
        # Global attention on layer 0 only: the last rank's layers all slide.
        "global-first": {"layer_types": GLOBAL_FIRST},
    },
    "mimo_v2_flash": {
        # Full attention in the middle, sliding at the ends; dense on the odd layers.
        "full-middle": {"hybrid_layer_pattern": [1, 0, 0, 1], "moe_layer_freq": [1, 0, 1, 0]},
    },
    "minimax_m3_vl": {
        # Block-sparse attention at the ends, dense in the middle; experts on the even layers.
        "sparse-ends": {
            "text_config": {
                **tiny_config("minimax_m3_vl")["text_config"],
                "moe_layer_freq": [1, 0, 1, 0],
                "sparse_attention_config": {
                    **tiny_config("minimax_m3_vl")["text_config"]["sparse_attention_config"],
                    "sparse_attention_freq": [1, 0, 0, 1],
                },
            }
        },
    },
    "ministral3": {
        # Full attention on layer 0 only: the last rank's layers all slide.
        "full-first": {"layer_types": GLOBAL_FIRST},
    },
    "mistral3": {
        # Sliding windows on the first two layers, full attention on the last two.
        "sliding-first-2": {
            "text_config": {
                **tiny_config("mistral3")["text_config"],
                "sliding_window": 4,
                "layer_types": [
                    "sliding_attention",
                    "sliding_attention",
                    "full_attention",
                    "full_attention",
                ],
            }
        },
    },
    "muse_glimmer": {
        # Global attention on the even layers instead of the last.
        "global-even": {
            "layer_types": [
                "full_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
            ]
        },
    },
    "nemotron-nas": {
        # The block configs in reverse: the linear and no-op blocks come first.
        "reversed-blocks": {"block_configs": tiny_config("nemotron-nas")["block_configs"][::-1]},
    },
    "nemotron_h": {
        # Attention first, Mamba then a plain MLP last: the middle rank of three
        # runs experts only, and the last rank no attention.
        "attention-first": {"hybrid_override_pattern": "*EM-"},
    },
    "olmo3": {
        # Global attention on layer 0 only: the last rank's layers all slide.
        "global-first": {"layer_types": GLOBAL_FIRST},
    },
    "olmo_hybrid": {
        # Full attention on layer 1 only: the last rank runs linear attention alone.
        "attention-2nd": {
            "layer_types": [
                "linear_attention",
                "full_attention",
                "linear_attention",
                "linear_attention",
            ]
        },
    },
    "openelm": {
        # The per-layer head counts and MLP widths in reverse: widest first.
        "widths-reversed": {
            "num_query_heads": [4, 3, 3, 2],
            "num_kv_heads": [2, 1, 1, 1],
            "ffn_multipliers": [2.0, 1.5, 1.0, 0.5],
        },
    },
    "plamo2": {
        # Mamba every 3: attention on layer 1 only, at a boundary.
        "attention-2nd": {"mamba_step": 3},
    },
    "plamo3": {
        # Global on layer 2 only instead of the odd layers.
        "global-3rd": {"sliding_window_pattern": 3},
    },
    "prism_hadamard_qwen35": {
        # Full attention on the odd layers; the unrotated down projection on layer 1.
        "attention-odd": {
            "text_config": {
                **tiny_config("prism_hadamard_qwen35")["text_config"],
                "full_attention_interval": 2,
            },
            "modules": [
                {**m, "block": 0 if i == 1 else 512}
                for i, m in enumerate(tiny_config("prism_hadamard_qwen35")["modules"])
            ],
        },
    },
    "qwen3_5": {
        # Full attention on the odd layers instead of the last only.
        "attention-odd": {
            "text_config": {**tiny_config("qwen3_5")["text_config"], "full_attention_interval": 2}
        },
    },
    "qwen3_5_moe": {
        # Full attention on layer 2 only instead of the odd layers.
        "attention-3rd": {
            "text_config": {
                **tiny_config("qwen3_5_moe")["text_config"],
                "full_attention_interval": 3,
            }
        },
    },
    "qwen3_moe": {
        # Experts on the odd layers only (decoder_sparse_step 2).
        "experts-odd": {"decoder_sparse_step": 2, "mlp_only_layers": []},
    },
    "qwen3_next": {
        # Full attention on the odd layers; a dense MLP on layer 2.
        "attention-odd-dense-3rd": {"full_attention_interval": 2, "mlp_only_layers": [2]},
    },
    "recurrent_gemma": {
        # Attention on the even layers, recurrent on the odd; a window of 2.
        "attention-even-window-2": {
            "block_types": ["attention", "recurrent"],
            "attention_window_size": 2,
        },
    },
    "smollm3": {
        # NoPE on the even layers instead of the last.
        "nope-even": {"no_rope_layers": [0, 1, 0, 1]},
    },
    "spark2_5": {
        # Full attention on layer 1 only: the last rank's layers all slide.
        "full-2nd": {
            "layer_types": [
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention",
            ]
        },
    },
    "step3p5": {
        # Full attention in the middle, sliding at the ends; experts on the even layers.
        "full-middle": {
            "layer_types": FULL_MIDDLE,
            "rope_theta": [10000.0, 5000000.0, 5000000.0, 10000.0],
            "partial_rotary_factors": [1.0, 0.5, 0.5, 1.0],
            "moe_layers_enum": "0,2",
        },
    },
}


# Splits (layers per rank, rank 0 first) for the multi-rank family tests where the
# even split would not cut through what a family's layers share: a cross-layer
# attention pair, a KV-sharing group, a stream handed along. {family: {ranks: split}}
SPLITS: dict[str, dict[int, list[int]]] = {
    # Layers 2 and 3 share keys and values; rank 0 runs layer 3 alone.
    "hunyuan": {2: [1, 3]},
    # Residual blocks of 2 layers: the boundary falls inside the second block.
    "kimi_k3": {2: [1, 3]},
}


def variants() -> list[tuple[str, str, dict[str, Any]]]:
    """Every extra config of ``VARIANTS``, as (family, name, overrides)."""
    return [(f, name, o) for f, named in VARIANTS.items() for name, o in named.items()]


def reference(family: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """``build``'s model, to compare with: mlx-lm's own forward pass kept well defined.

    mlx-lm's phi3small masks the dummy token ids of the real 100352-entry
    vocabulary with a scatter that MLX does not bound-check: with a smaller
    vocabulary it writes past the logits (corrupt memory, not an error). The
    reference keeps only the ids inside its vocabulary.
    """
    model = build(family, seed=seed, **overrides)
    if family == "phi3small":
        ids = model._dummy_tokenizer_ids
        inside = [i for i in ids.tolist() if i < vocab_size(model)]
        model._dummy_tokenizer_ids = mx.array(inside, dtype=ids.dtype)
    return model


def _unzero(w: mx.array) -> mx.array:
    if mx.issubdtype(w.dtype, mx.floating) and w.size and not mx.any(w).item():
        return 0.02 * mx.random.normal(w.shape, dtype=w.dtype)
    return w


def config_int(model: nn.Module, key: str) -> int:
    """An integer from the model's config (or its text_config)."""
    args = getattr(model, "args", None) or getattr(model, "config", None)
    for holder in (args, getattr(args, "text_config", None)):
        if isinstance(holder, dict):
            value = holder.get(key)
        else:
            value = getattr(holder, key, None)
        if value:
            return int(value)
    raise AssertionError(f"no {key} in the config of {type(model)}")


def vocab_size(model: nn.Module) -> int:
    try:
        return config_int(model, "vocab_size")
    except AssertionError:
        return config_int(model, "num_vocab")  # phixtral


def hidden_size(model: nn.Module) -> int:
    """The width of the hidden states, read off the input embedding."""
    from ppwrap import PipelineHead

    embedding = PipelineHead.wrap(model).parts.embedding
    if embedding is None:
        return config_int(model, "hidden_size")
    return int(embedding(mx.zeros((1, 1), dtype=mx.int32)).shape[-1])


def prompt(model: nn.Module, length: int = 7, *, seed: int = 1) -> mx.array:
    """A deterministic prompt of token ids inside the model's vocabulary."""
    key = mx.random.key(seed)
    return mx.random.randint(0, min(vocab_size(model), 100), (1, length), key=key)


# The dtype mixes of real checkpoints: the dtype of each floating parameter,
# by the first rule whose pattern its dotted path matches.
MIXES: dict[str, list[tuple[str, str]]] = {
    # Half-precision weights, float32 norms (GGUF imports, many fine-tunes).
    "f16-f32-norms": [(r"norm", "float32"), (r".", "float16")],
    "bf16-f32-norms": [(r"norm", "float32"), (r".", "bfloat16")],
    # MoE checkpoints that keep the router (and norms) in float32.
    "f16-f32-router": [(r"norm|(^|\.)gate\.", "float32"), (r".", "float16")],
    # Quantized with float16 scales and biases; norms stay float32.
    "f16-scales": [(r"norm", "float32"), (r".", "float16")],
}


# Families whose mixes stay float32 on MLX's CPU, and why.
CPU_FLOAT32_ONLY = {
    "phixtral": "its experts run through gather_mm, which MLX's CPU runs in float32 only"
}


def cast(model: nn.Module, mix: str) -> nn.Module:
    """Give ``model``'s floating parameters the dtypes of the mix ``mix`` (in place)."""
    import re

    from mlx.utils import tree_map_with_path

    rules = MIXES[mix]

    def one(path: str, w: mx.array) -> mx.array:
        if not mx.issubdtype(w.dtype, mx.floating):
            return w  # packed quantized weights, integer buffers
        dtype = next(d for pattern, d in rules if re.search(pattern, path))
        return w.astype(getattr(mx, dtype))

    model.update(tree_map_with_path(one, model.parameters()))
    mx.eval(model.parameters())
    return model


def dtypes(model: nn.Module) -> set[str]:
    """The dtypes of ``model``'s floating parameters."""
    from mlx.utils import tree_flatten

    return {
        str(w.dtype).removeprefix("mlx.core.")
        for _, w in tree_flatten(model.parameters())
        if mx.issubdtype(w.dtype, mx.floating)
    }


def write_checkpoint(
    family: str,
    path: Path,
    *,
    seed: int = 0,
    bits: int | None = None,
    mix: str | None = None,
    **overrides: Any,
) -> Path:
    """Save a tiny random ``family`` model as an mlx-lm checkpoint folder.

    With ``bits``, the weights are quantized first, as ``mlx_lm.convert -q``
    does; with ``mix``, the parameters get the dtypes of that mix (``MIXES``).
    """
    from mlx_lm.utils import quantize_model, save_config, save_model

    model = build(family, seed=seed, **overrides)
    config = tiny_config(family, **overrides)
    if bits is not None:
        model, config = quantize_model(model, config, group_size=32, bits=bits)
    if mix is not None:
        cast(model, mix)
    save_model(path, model)
    save_config(config, path / "config.json")
    return path


TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pipeline stages pass hidden "
    "states from rank to rank; only the final rank runs the output head. "
    "Paris is the capital of France. One, two, three, four, five."
)


def write_tokenizer(path: Path, *, vocab_size: int = 300) -> int:
    """Train a small byte-level BPE tokenizer into ``path``; return its vocab size.

    A real ``tokenizer.json`` (the ``tokenizers`` library's format) with an
    end-of-sequence token and a chat template, as a checkpoint folder has.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TOKENIZER_TEXT] * 4, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "chat_template": template,
            }
        )
    )
    return int(tok.get_vocab_size())


def write_model_folders(root: Path, specs: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """One folder per spec under ``root``: ``{name: {"family": ..., **write_model_folder options}}``
    (the family defaults to the name)."""
    made = {}
    for name, spec in specs.items():
        spec = dict(spec)
        made[name] = write_model_folder(spec.pop("family", name), root / name, **spec)
    return made


def greedy_tokens(folders: dict[str, Path], prompt: str, tokens: int) -> dict[str, list[int]]:
    """Single-process mlx-lm's greedy tokens for each folder."""
    from mlx_lm import load, stream_generate

    found = {}
    for name, path in folders.items():
        model, tok = load(str(path))
        found[name] = [r.token for r in stream_generate(model, tok, prompt, max_tokens=tokens)]
    return found


def write_model_folder(family: str, path: Path, **kwargs: Any) -> Path:
    """A complete checkpoint folder: tiny random weights and a real tokenizer."""
    vocab = write_tokenizer(path)
    return write_checkpoint(family, path, vocab_size=vocab, **kwargs)


class FakeGroup:
    """Stands in for ``mx.distributed.Group`` in single-process split tests: a rank
    and a size, and nothing sent (tests that pass messages patch send and recv)."""

    def __init__(self, rank: int = 0, size: int = 2) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

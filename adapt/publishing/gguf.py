"""Write a full-attention diffusion checkpoint as a GGUF file that llama.cpp's `llama-diffusion-cli` runs.

LLaMA-like checkpoints become llama.cpp's `llada` architecture, Qwen2-like ones its `dream` architecture;
both run with non-causal attention in llama.cpp, and `diffusion.shift_logits` tells its sampler whether
the logits at i predict token i + 1 (adapt's `shift`). llama.cpp's `llada` applies RoPE to consecutive
pairs of a head's values, Hugging Face's LLaMA to its two halves: the rows of Q and K (weights and biases)
are reordered per head so that both compute the same attention (`rope_pairs`; `rope_halves` undoes it).
`dream` applies RoPE as Hugging Face's Qwen2 does: nothing is reordered. Tied embeddings are written
out as `output.weight`. Block-diffusion checkpoints are refused: llama.cpp's sampler attends over the
whole canvas at every step, which is not how they were trained.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from adapt.core.checkpoint import check_model_dir, load_settings
from adapt.core.errors import AdaptError

TYPES = ("f32", "f16", "q8_0")
ARCHS = {"llama": "llada", "qwen2": "dream"}
"""Hugging Face model_type -> llama.cpp architecture."""
SUPPORTED = "llama (as llama.cpp's LLaDA) and qwen2 (as its Dream)"
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


def rope_pairs(w: Any, n_head: int) -> Any:
    """[n_head * d, ...] rows of a head in halves (x0..x_{d/2-1}, y0..) -> in pairs (x0, y0, x1, y1, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_halves(w: Any, n_head: int) -> Any:
    """The inverse of `rope_pairs`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(ckpt: Path) -> dict[str, Any]:
    """config.json of a full-attention LLaMA/Qwen2 diffusion checkpoint; one clear refusal otherwise."""
    check_model_dir(ckpt)
    settings = load_settings(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    kind = config.get("model_type")
    if kind not in ARCHS:
        raise AdaptError(
            f"{ckpt} is a {kind} model; GGUF export supports {SUPPORTED}, the two masked-diffusion "
            "architectures llama.cpp's llama-diffusion-cli runs"
        )
    if settings.block_size is not None:
        raise AdaptError(
            f"{ckpt} is a block-diffusion checkpoint (block_size {settings.block_size}); GGUF export "
            "supports full-attention checkpoints only: llama-diffusion-cli attends over the whole canvas "
            "at every step"
        )
    if kind == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        raise AdaptError(f"{ckpt}: llama.cpp's LLaDA graph drops the output-projection bias; not exportable")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise AdaptError(f"{ckpt}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not exported")
    config["_settings"] = settings
    return config


def read_weights(ckpt: Path) -> dict[str, Any]:
    """Every tensor of the checkpoint's safetensors files, as float32 numpy arrays."""
    import torch
    from safetensors.torch import load_file

    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise AdaptError(f"{ckpt} has no .safetensors weights")
    out: dict[str, Any] = {}
    for f in files:
        for name, t in load_file(f).items():
            out[name] = t.to(torch.float32).numpy()
    return out


def gguf_tensors(config: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """GGUF name -> float32 array in llama.cpp's layout (Q/K rows in pairs for LLaDA, tied head written)."""
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    llada = ARCHS[config["model_type"]] == "llada"
    out = {GLOBAL_TENSORS[k]: weights[k] for k in GLOBAL_TENSORS}
    out["output.weight"] = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    for i in range(config["num_hidden_layers"]):
        for hf, name in LAYER_TENSORS.items():
            w = weights.get(f"model.layers.{i}.{hf}")
            if w is None:
                if hf.endswith(".bias"):
                    continue
                raise AdaptError(f"the checkpoint has no tensor model.layers.{i}.{hf}")
            if llada and hf.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                w = rope_pairs(w, n_head if "q_proj" in hf else n_kv)
            out[f"blk.{i}.{name}"] = w
    unused = set(weights) - {
        f"model.layers.{i}.{k}" for i in range(config["num_hidden_layers"]) for k in LAYER_TENSORS
    }
    unused -= {*GLOBAL_TENSORS, "lm_head.weight"}
    unused = {k for k in unused if not k.endswith("rotary_emb.inv_freq")}
    if unused:
        raise AdaptError(
            f"the checkpoint has tensors GGUF export does not map: {', '.join(sorted(unused)[:5])}"
        )
    return out


def pre_tokenizer(tok: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (byte-level BPE: GPT-2's regex, or Qwen2's)."""
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        multi_digit = any(len(t) > 1 and t.isdigit() for t in tok["model"]["vocab"])
        return "gpt-2" if multi_digit else "smollm"  # smollm: GPT-2's regex, digits one by one, spaces kept
    if pre.get("type") == "Sequence":
        kinds = [p.get("type") for p in pre.get("pretokenizers", [])]
        if kinds == ["Split", "ByteLevel"]:
            return "qwen2"
    raise AdaptError(
        f"the tokenizer's pre-tokenizer {json.dumps(pre)[:120]} has no known llama.cpp equivalent"
    )


def vocabulary(ckpt: Path, n_rows: int, mask_id: int) -> dict[str, Any]:
    """Tokens, types, merges and special ids of the checkpoint's tokenizer, padded to the embedding rows."""
    import gguf
    from transformers import AutoTokenizer

    path = ckpt / "tokenizer.json"
    if not path.is_file():
        raise AdaptError(f"{ckpt} has no tokenizer.json; GGUF export needs a fast (BPE) tokenizer")
    tok = json.loads(path.read_text())
    if tok.get("model", {}).get("type") != "BPE":
        raise AdaptError(f"{ckpt}: GGUF export supports byte-level BPE tokenizers only")
    hf = AutoTokenizer.from_pretrained(ckpt)
    by_id = {i: t for t, i in hf.get_vocab().items()}
    specials = {i for i, t in hf.added_tokens_decoder.items() if t.special}
    added = set(hf.get_added_vocab().values())
    tokens, types = [], []
    for i in range(n_rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            kind = gguf.TokenType.NORMAL
            if i in added:
                kind = (
                    gguf.TokenType.CONTROL if i in specials or i == mask_id else gguf.TokenType.USER_DEFINED
                )
            types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    probe = hf("a").input_ids
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "pre": pre_tokenizer(tok),
        "bos": hf.bos_token_id,
        "eos": hf.eos_token_id,
        "pad": hf.pad_token_id,
        "add_bos": bool(probe) and probe[0] == hf.bos_token_id,
        "chat_template": hf.chat_template if isinstance(hf.chat_template, str) else None,
    }


def encode(array: Any, kind: str) -> tuple[Any, Any]:
    """(data, GGML type) of a float32 array at `kind`; vectors and odd row lengths stay f32/f16."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if array.ndim == 1 or kind == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), Q.F32
    if kind == "q8_0" and array.shape[-1] % 32 == 0:
        return quants.quantize(np.ascontiguousarray(array, dtype=np.float32), Q.Q8_0), Q.Q8_0
    return np.ascontiguousarray(array, dtype=np.float16), Q.F16


def write_gguf(
    ckpt: str | os.PathLike, out: str | os.PathLike, kind: str = "f32", force: bool = False
) -> Path:
    """Write `ckpt` as GGUF `out` (a temporary file beside it, renamed into place); returns `out`."""
    import gguf

    from adapt.core.boundary import check_output_file

    ckpt, out = Path(ckpt), Path(out)
    if kind not in TYPES:
        raise AdaptError(f"unknown GGUF type {kind!r}; choose one of {', '.join(TYPES)}")
    if out.exists() and not force:
        raise AdaptError(f"{out} exists; pass --force to replace it")
    check_output_file(out, "OUT")
    config = read_config(ckpt)
    settings = config.pop("_settings")
    weights = read_weights(ckpt)
    tensors = gguf_tensors(config, weights)
    n_rows = tensors["token_embd.weight"].shape[0]
    vocab = vocabulary(ckpt, n_rows, settings.mask_token_id)
    arch = ARCHS[config["model_type"]]
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(ckpt.name)
        w.add_context_length(config["max_position_embeddings"])
        w.add_embedding_length(config["hidden_size"])
        w.add_block_count(config["num_hidden_layers"])
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_head_count(n_head)
        w.add_head_count_kv(config.get("num_key_value_heads") or n_head)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        rope = config.get("rope_parameters") or {}
        w.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
        w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        w.add_vocab_size(n_rows)
        w.add_causal_attention(False)
        w.add_diffusion_shift_logits(bool(settings.shift))
        w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[kind])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        for key, add in (
            ("bos", w.add_bos_token_id),
            ("eos", w.add_eos_token_id),
            ("pad", w.add_pad_token_id),
        ):
            if vocab[key] is not None:
                add(vocab[key])
        w.add_mask_token_id(settings.mask_token_id)
        w.add_add_bos_token(vocab["add_bos"])
        w.add_add_eos_token(False)
        if vocab["chat_template"]:
            w.add_chat_template(vocab["chat_template"])
        for name, array in tensors.items():
            data, qtype = encode(array, kind)
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise AdaptError(f"cannot write {out}: {e.strerror or e}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return out

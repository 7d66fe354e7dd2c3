"""`adapt gguf`: the GGUF file read back with gguf.GGUFReader matches the checkpoint, tensor by tensor and in
its metadata; bad inputs fail in one line with nothing written; (slow) llama.cpp decodes it as adapt does."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from test_bad_inputs import check_one_error_line, tree
from typer.testing import CliRunner

from adapt.cli import app
from adapt.publishing.gguf import LAYER_TENSORS, rope_halves, rope_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted tiny llama and qwen2 checkpoints, a gpt2 one, and a block-diffusion copy of llama."""
    from adapt.conversion.convert import convert
    from adapt.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("gguf")
    for arch in ("llama", "qwen2", "gpt2"):
        convert(
            str(build_tiny_model(arch, root / f"src-{arch}", spare_rows=8 if arch == "qwen2" else 0)),
            root / arch,
        )
    shutil.copytree(root / "llama", root / "block")
    config = json.loads((root / "block" / "config.json").read_text())
    config["diffusion"]["block_size"] = 4
    (root / "block" / "config.json").write_text(json.dumps(config))
    return root


def export(ckpt: Path, out: Path, *extra: str) -> object:
    return CliRunner().invoke(app, ["gguf", str(ckpt), str(out), *extra], env={"ADAPT_DEBUG": ""})


def field(reader: object, key: str) -> object:
    return reader.fields[key].contents()  # type: ignore[attr-defined]


def test_rope_pairs_is_inverted_by_rope_halves() -> None:
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    paired = rope_pairs(w, 4)
    assert not np.array_equal(paired, w)
    assert np.array_equal(paired[:4, 0], w[[0, 4, 1, 5], 0])  # head 0: x0, y0, x1, y1 (d = 8, halves of 4)
    assert np.array_equal(rope_halves(paired, 4), w)


@pytest.mark.parametrize(
    ("arch", "kind"),
    [("llama", "f32"), ("llama", "f16"), ("llama", "q8_0"), ("qwen2", "f32"), ("qwen2", "q8_0")],
)
def test_gguf_matches_the_checkpoint(world: Path, tmp_path: Path, arch: str, kind: str) -> None:
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    out = tmp_path / "m.gguf"
    result = export(world / arch, out, "--type", kind)
    assert result.exit_code == 0, result.output
    config = json.loads((world / arch / "config.json").read_text())
    reader = gguf.GGUFReader(out)
    name = {"llama": "llada", "qwen2": "dream"}[arch]
    assert field(reader, "general.architecture") == name
    assert field(reader, f"{name}.context_length") == config["max_position_embeddings"]
    assert field(reader, f"{name}.attention.causal") is False
    assert field(reader, "diffusion.shift_logits") is True
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    mask = config["diffusion"]["mask_token_id"]
    assert field(reader, "tokenizer.ggml.mask_token_id") == mask
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"]
    tok = AutoTokenizer.from_pretrained(world / arch)
    assert tokens[mask] == "<|mask|>" and all(tokens[i] == t for t, i in tok.get_vocab().items())
    assert field(reader, "tokenizer.ggml.token_type")[mask] == gguf.TokenType.CONTROL

    weights = {k: v.astype(np.float32) for k, v in load_file(world / arch / "model.safetensors").items()}
    expected = {
        "token_embd.weight": weights["model.embed_tokens.weight"],
        "output_norm.weight": weights["model.norm.weight"],
    }
    expected["output.weight"] = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    for i in range(config["num_hidden_layers"]):
        for hf, g in LAYER_TENSORS.items():
            if f"model.layers.{i}.{hf}" in weights:
                expected[f"blk.{i}.{g}"] = weights[f"model.layers.{i}.{hf}"]
    assert sorted(t.name for t in reader.tensors) == sorted(expected)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for t in reader.tensors:
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected[t.name].shape).astype(np.float32)
        part = t.name.split(".")[-2]
        if name == "llada" and part in heads:
            got = rope_halves(got, heads[part])  # undo the Q/K reordering llama.cpp's LLaDA path needs
        want = expected[t.name]
        if kind == "f32" or want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want), t.name
        elif kind == "f16":
            np.testing.assert_allclose(got, want.astype(np.float16).astype(np.float32), rtol=0, atol=0)
        else:  # q8_0: 32 values share an f16 scale max/127: half a step, plus the scale's f16 rounding
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, t.name
            blocks = want.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert (np.abs(got.reshape(-1, 32) - blocks) <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), t.name


def test_llama_rope_reordering_is_applied(world: Path, tmp_path: Path) -> None:
    import gguf
    from safetensors.numpy import load_file

    out = tmp_path / "m.gguf"
    assert export(world / "llama", out).exit_code == 0
    q = {t.name: t for t in gguf.GGUFReader(out).tensors}["blk.0.attn_q.weight"]
    hf = load_file(world / "llama" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    got = np.asarray(q.data).reshape(hf.shape)
    assert not np.array_equal(got, hf) and np.array_equal(got, rope_pairs(hf, 4))


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("gpt2", "supports llama (as llama.cpp's LLaDA) and qwen2"),
        ("block", "is a block-diffusion checkpoint"),
        ("exists", "exists; pass --force"),
        ("readonly", "cannot"),
        ("src-llama", "not a diffusion checkpoint"),
        ("badtype", "unknown GGUF type"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(world: Path, tmp_path: Path, case: str, says: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.gguf"
    ckpt, extra = world / "llama", []
    if case == "exists":
        out.write_bytes(b"keep me")
    elif case == "readonly":
        if sys.platform == "win32" or __import__("os").geteuid() == 0:
            out = Path("/proc/m.gguf")  # root ignores permission bits; /proc accepts no new file
        else:
            out_dir.chmod(0o500)
    elif case == "badtype":
        extra = ["--type", "q4_0"]
    else:
        ckpt = world / case
    before, sources = tree(out_dir), tree(world)
    result = export(ckpt, out, *extra)
    check_one_error_line(result, says)
    out_dir.chmod(0o700)
    assert tree(out_dir) == before and tree(world) == sources


def test_force_replaces_an_existing_file(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    assert export(world / "qwen2", out, "--force").exit_code == 0
    assert out.read_bytes()[:4] == b"GGUF" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def train_on_answers(ckpt: Path, rows: list[tuple[list[int], list[int]]], steps: int = 1000) -> None:
    """Masked-diffusion training on (prompt ids, answer ids) rows, answers masked only, saved in place: the
    model learns the answers, so its greedy choices are separated by clear margins."""
    import torch
    from transformers import AutoModelForCausalLM

    from adapt.core.checkpoint import load_settings
    from adapt.core.diffusion import mask_tokens

    mask_id = load_settings(ckpt).mask_token_id
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.tensor([p + a + [a[-1]] * (width - len(p) - len(a)) for p, a in rows])
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, a) in enumerate(rows):
        maskable[i, len(p) : len(p) + len(a)] = True
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        t = torch.rand(len(rows), generator=gen) * 0.999 + 1e-3
        noisy, masked = mask_tokens(ids, t, mask_id, maskable, generator=gen)
        logits, m = model(noisy).logits[:, :-1], masked[:, 1:]  # shift: position i predicts token i + 1
        loss = torch.nn.functional.cross_entropy(logits[m], ids[:, 1:][m])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(ckpt)


def chat(tok: object, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "block", "top_k"), [("llama", 8, 0), ("llama", 1, 1), ("qwen2", 1, 1)])
def test_llama_cpp_decodes_as_adapt_sample(
    world: Path, tmp_path: Path, arch: str, block: int, top_k: int
) -> None:
    """llama.cpp's llama-diffusion-cli (built from the llama-cpp-python sdist, cached) on the f32 export gives
    the tokens of `adapt sample`: greedy, confidence-based, the same steps and block length.

    llama.cpp has no greedy confidence-based mode: at temperature 0 (top-k 0) it still draws from the
    softmax, so the tokens agree only where the model's margins are clear. The tiny llama trained here has
    them; the tiny qwen2 (Dream) trained the same way does not (top-1 near 0.4 at some positions). With
    --top-k 1 llama.cpp takes the argmax but every confidence is 1: with blocks of 1 token both decode
    greedily left to right, an exact check of the forward pass for both architectures."""
    import subprocess

    from transformers import AutoTokenizer

    from adapt.tiny import SAMPLE_TEXT
    from bench.llama_cpp import ensure_built, run_diffusion

    exe = ensure_built()
    ckpt = tmp_path / arch
    shutil.copytree(world / arch, ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    gen, steps_per_block = 16, 4 if block > 1 else 1
    prompts, rows = [], []
    for line in SAMPLE_TEXT.splitlines()[:6]:  # the prompt: the first words, as many as make whole blocks
        words = line.split(" ")
        k = next(
            k for k in range(1, len(words)) if len(tok(chat(tok, " ".join(words[:k]))).input_ids) % 8 == 0
        )
        prompts.append(" ".join(words[:k]))
        answer = (tok(" " + " ".join(words[k:])).input_ids + [tok.eos_token_id] * gen)[:gen]
        rows.append((tok(chat(tok, prompts[-1])).input_ids, answer))
    train_on_answers(ckpt, rows)
    out = tmp_path / "m.gguf"
    assert export(ckpt, out).exit_code == 0
    for prompt in prompts[:3]:
        text = chat(tok, prompt)
        cmd = [sys.executable, "-m", "adapt", "sample", str(ckpt), "--prompt", text, "--gen-length", str(gen)]
        cmd += ["--block-length", str(block), "--steps", str(steps_per_block * gen // block), "--json"]
        cmd += ["--no-stop-at-eos", "--no-stream", "--dtype", "float32", "--device", "cpu"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr
        ours = json.loads(proc.stdout)["sequences"][0]
        n_input = len(tok(text).input_ids)
        theirs, _ = run_diffusion(exe, out, prompt, n_input, gen, block, steps_per_block, top_k=top_k)
        # llama.cpp prints text without special tokens: compare with ours decoded the same way (its text read
        # back into tokens can split differently: BPE of a decoded text is not always the tokens decoded)
        assert theirs == tok.decode(ours, skip_special_tokens=True), (prompt, theirs, ours)

"""The sampling-speed bench runs end to end on the tiny default model and reports what it claims."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sample_speed_bench_reports_every_row(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(ROOT / "bench" / "sample_speed.py"), "--gen-length", "16"]
    cmd += ["--block-length", "8", "--prompt-length", "16", "--thresholds", "0.9,0.0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    settings = rows.pop("settings")
    assert settings["gen_length"] == "16"
    names = list(rows)
    assert names[0].startswith("reference loop") and rows[names[0]]["speedup"] == 1.0
    assert len(names) == 2 + 2 * 3 + 1  # reference, low-confidence, 2 thresholds x (none, prefix, dual), AR
    # Threshold 0 takes a whole block per step: 2 NFE for 16 tokens in blocks of 8, without a cache.
    assert rows["engine threshold 0, no cache"]["nfe_per_token"] == 2 / 16
    # Greedy low-confidence decoding is the reference loop's: same tokens, same judge score.
    assert rows[names[1]]["judge_ppl"] == rows[names[0]]["judge_ppl"]
    assert rows["engine threshold 0.9, no cache"]["agreement"] == 1.0
    assert "target >= 3x" in proc.stdout and proc.stdout.count("| engine") == 7


def test_block_speed_bench_compares_with_the_ar_source(tmp_path: Path) -> None:
    out = tmp_path / "block.json"
    cmd = [sys.executable, str(ROOT / "bench" / "block_speed.py"), "--gen-length", "12", "--prompts", "2"]
    cmd += ["--prompt-lengths", "16", "--batches", "1,2", "--thresholds", "0.9,0.0", "--block", "4"]
    cmd += ["--entropy-bounds", "1e9", "--threads", "1", "--repeats", "2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert set(record["rows"]) == {"prompt 16 tokens, batch 1", "prompt 16 tokens, batch 2"}
    for rows in record["rows"].values():
        ar = rows["AR source, greedy generate + KV cache"]
        assert ar["speedup"] == 1.0 and ar["passes_per_token"] == 1.0 and ar["pass_cost"] == 1.0
        for r in rows.values():
            if isinstance(r, dict) and "passes" in r:  # speed = passes per token x cost per pass
                assert r["speedup"] == pytest.approx(1 / (r["passes_per_token"] * r["pass_cost"]))
        # threshold 0 commits a whole block per step: prompt 17 tokens (BOS), blocks of 4 -> the 12 new
        # tokens span columns 17-28: blocks [16, 20) [20, 24) [24, 28) [28, 32), 4 passes
        assert rows["block, threshold 0.0 + exact cache"]["passes_per_token"] == 4 / 12
        assert rows["block, entropy bound 1000000000.0 + exact cache"]["passes_per_token"] == 4 / 12
        assert rows["block, 1 token/step + exact cache"]["passes_per_token"] == 1.0
        assert rows["block, threshold 0.9, no cache (reference)"]["agreement"] == 1.0  # the cache is exact
    assert proc.stdout.count("target (>= 1.0x the AR source's tokens/s") == 2


def test_distill_corpus_is_the_sources_own_greedy_continuation(llama_src: Path) -> None:
    import io

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "bench"))
    from distill_corpus import continue_greedily, windows

    from adapt.tiny import SAMPLE_TEXT

    tok = AutoTokenizer.from_pretrained(llama_src)
    model = AutoModelForCausalLM.from_pretrained(llama_src).eval()
    prompts = windows(tok, [SAMPLE_TEXT, SAMPLE_TEXT[100:]], length=8, stride=16, n=5)
    assert len(prompts) == 5 and all(len(p) == 8 for p in prompts)
    assert prompts[1] != prompts[0]  # round-robin: the second window comes from the second document
    sink = io.StringIO()
    continue_greedily(model, tok, prompts, gen_length=6, batch=2, sink=sink)
    lines = [json.loads(line)["text"] for line in sink.getvalue().splitlines()]
    for prompt, text in zip(prompts, lines, strict=True):
        ids = torch.tensor([prompt])
        alone = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                               do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
        assert text == tok.decode(alone[0].tolist())


def test_memory_table_counts_the_parameters_a_model_really_has(llama_src: Path) -> None:
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "bench"))
    from memory_per_gpu import ADAMW_FP32, Dims, bytes_per_gpu, lora_parameters, parameters

    model = AutoModelForCausalLM.from_pretrained(llama_src)
    c = model.config
    shape = (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads)
    dims = Dims("tiny", *shape, c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings, c.head_dim)
    assert parameters(dims) == sum(p.numel() for p in model.parameters())
    from peft import LoraConfig, get_peft_model

    from adapt.training.lora import lora_target_modules

    lora = get_peft_model(model, LoraConfig(r=4, target_modules=lora_target_modules(model)))
    adapters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert lora_parameters(dims, 4) == adapters + c.hidden_size  # + the trained mask-token row
    n = 1000
    assert bytes_per_gpu(n, n, "DDP", 8) == ADAMW_FP32 * n
    assert bytes_per_gpu(n, n, "ZeRO-3", 8) == bytes_per_gpu(n, n, "FSDP2", 8) == ADAMW_FP32 * n / 8
    assert bytes_per_gpu(n, n, "ZeRO-2", 8) == 4 * n + 12 * n / 8
    from memory_per_gpu import host_bytes_loading

    assert host_bytes_loading(n, "DDP", 8, rank0=False) == host_bytes_loading(n, "ZeRO-2", 8, True) == 4 * n
    assert host_bytes_loading(n, "FSDP2", 8, False) == host_bytes_loading(n, "ZeRO-3", 8, False) == n / 2
    assert host_bytes_loading(n, "ZeRO-3", 8, rank0=True) == 4 * n + n / 2
    from memory_per_gpu import teacher_bytes_per_gpu

    assert teacher_bytes_per_gpu(n, "DDP", 8) == teacher_bytes_per_gpu(n, "ZeRO-2", 8) == 2 * n
    assert teacher_bytes_per_gpu(n, "FSDP2", 8) == teacher_bytes_per_gpu(n, "ZeRO-3", 8) == n / 4


@pytest.mark.slow
def test_load_memory_bench_reports_each_rank_of_each_loading(llama_diffusion: Path, tmp_path: Path) -> None:
    """On the tiny model (too small for the memory figures to mean anything): FSDP2 read whole, then
    from rank 0, one row per rank with what engine.json recorded."""
    cmd = [sys.executable, str(ROOT / "bench/load_memory.py"), "--model", str(llama_diffusion), "--out"]
    cmd += [str(tmp_path), "--engines", "fsdp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| FSDP2")]
    assert [row.split(" | ")[1:3] for row in rows] == [
        ["whole (whole)", "0"], ["whole (whole)", "1"],
        ["sharded (rank 0 + broadcast)", "0"], ["sharded (rank 0 + broadcast)", "1"],
    ]  # fmt: skip
    proc = subprocess.run([*cmd, "--teacher"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split(" | ")[1:4] for line in proc.stdout.splitlines() if line.startswith("| FSDP2")]
    assert rows == [["rank 0 + broadcast", "0", "0.50"], ["rank 0 + broadcast", "1", "0.50"]]


def test_pass_cost_bench_times_every_pass_size_against_generate(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    cmd = [sys.executable, str(ROOT / "bench" / "pass_cost.py"), "--max-new", "3", "--rounds", "2"]
    cmd += ["--new", "4", "--prompt-length", "16", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert sorted(result["passes"]) == ["1", "2", "3"] and result["ar_step_ms"] > 0
    for row in result["passes"].values():  # each ratio is the row's time over the AR step's
        assert abs(row["ar_steps"] - row["ms"] / result["ar_step_ms"]) < 1e-9
    assert proc.stdout.count("\n| ") == 4  # the header and M = 1, 2, 3


def test_verify_speed_bench_compares_every_decoder_with_the_ar_source(tmp_path: Path) -> None:
    out = tmp_path / "verify.json"
    cmd = [sys.executable, str(ROOT / "bench" / "verify_speed.py"), "--gen-length", "10", "--prompts", "2"]
    cmd += ["--prompt-lengths", "16", "--batches", "1,2", "--drafts", "d,3n,c3", "--threads", "1"]
    cmd += ["--ppl-windows", "2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert record["held_out_ppl"]["adapted AR stream"]["ppl"] == pytest.approx(
        record["held_out_ppl"]["AR source"]["ppl"], rel=1e-4
    )  # untrained: the AR stream is the source over its own vocabulary
    for rows in record["rows"].values():
        base, own = rows["AR source, greedy generate + KV cache"], rows["adapted, --strategy ar"]
        assert base["speedup"] == 1.0 and base["tokens_per_pass"] == 1.0 and own["tokens_per_pass"] == 1.0
        default = "adapted, verify, 1 drafts, mask blocks of 2 + redraft"
        named = (default, "adapted, verify, 3 drafts, mask blocks of 4")
        for name in (*named, "adapted, verify, 3 candidates, mask blocks of 2 + redraft"):
            r = rows[name]
            assert r["agreement_with_ar"] == 1.0  # float32: verify is the AR stream's greedy output
            positions = 1 if "candidates" in name else int(name.split(", ")[2][0])
            assert len(r["acceptance"]) == positions and r["tokens_per_pass"] >= 1.0
            # speed = tokens per pass / cost of a pass
            assert r["speedup"] == pytest.approx(r["tokens_per_pass"] / r["pass_cost"])
        assert own["agreement_with_ar"] == 1.0 and own["judge_ppl"] == rows[default]["judge_ppl"]
    assert proc.stdout.count("target (>= 1.5x the AR source's tokens/s") == 2


def test_serve_speed_bench_sends_every_request_both_ways_and_checks_the_answers(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(ROOT / "bench" / "serve_speed.py"), "--clients", "4", "--max-tokens", "4"]
    cmd += ["--max-batch", "4", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["clients"] == 4 and row["max_batch"] == 4
    assert row["equal_to_alone"] == 4  # a batch row equals its alone answer in float32
    assert row["speedup"] == pytest.approx(row["one_at_a_time_s"] / row["all_at_once_s"], rel=0.05)  # rounded


def test_long_context_bench_runs_every_objective_in_its_own_process(tmp_path: Path) -> None:
    out = tmp_path / "long.json"
    cmd = [sys.executable, str(ROOT / "bench" / "long_context.py"), "--lengths", "32", "--steps", "1"]
    cmd += ["--threads", "1", "--checkpointing", "on", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {(r["attn"], r["objective"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(a, o) for a in ("sdpa", "flex_attention") for o in ("ar", "full", "block")}
    sdpa = {o: rows["sdpa", o] for o in ("ar", "full", "block")}
    assert sdpa["ar"]["memory_vs_ar"] == 1.0 and sdpa["ar"]["step_vs_ar"] == 1.0
    for r in sdpa.values():  # each trained: finite losses, checkpointing really on, its own peak
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
        assert r["checkpointing_active"] and r["peak_gib"] >= r["loaded_gib"] > 0
        assert r["step_vs_ar"] == pytest.approx(r["step_s"] / sdpa["ar"]["step_s"])
    assert sdpa["block"]["mask"] == "bool [1, 1, 64, 64]"  # the pair [x_t ; x_0], one byte per pair
    assert sdpa["block"]["kernel"] == "adapt_pair_sdpa" and sdpa["ar"]["kernel"] == "sdpa"
    assert sdpa["full"]["mask"] == "int64 [1, 32]"  # bidirectional: the 2D padding mask, nothing dense
    flex = rows["flex_attention", "block"]
    if "failed" in flex:  # torch 2.13 on CPU
        assert "backward on CPU" in flex["failed"]
    else:
        assert flex["mask"] == "BlockMask"
    assert proc.stdout.count("| 32 | 1 | on |") == 6


@pytest.mark.slow
def test_long_context_bench_builds_random_weights_and_trains_under_bf16_autocast(tmp_path: Path) -> None:
    """--random-weights keeps the model's shapes but not its weights, --autocast bf16 changes the numbers:
    the step-1 losses differ from the plain run's on the same tokens; the joint objective (its teacher
    random too under --random-weights) trains in each."""
    cmd = [sys.executable, str(ROOT / "bench" / "long_context.py"), "--lengths", "32", "--steps", "0"]
    cmd += ["--threads", "1", "--checkpointing", "off", "--attn", "sdpa", "--objectives", "ar,block,joint"]
    losses = {}
    for name, extra in (("plain", []), ("random", ["--random-weights"]), ("bf16", ["--autocast", "bf16"])):
        out = tmp_path / f"{name}.json"
        run = [*cmd, *extra, "--json", str(out)]
        proc = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr
        rows = json.loads(out.read_text())["rows"]
        assert [r["objective"] for r in rows] == ["ar", "block", "joint"], rows
        assert all("failed" not in r for r in rows), rows
        losses[name] = [r["losses"][0] for r in rows]
    assert all(math.isfinite(x) for row in losses.values() for x in row)
    for name in ("random", "bf16"):
        assert all(abs(a - b) > 1e-6 for a, b in zip(losses[name], losses["plain"], strict=True)), losses
    assert all(abs(a - b) < 0.1 for a, b in zip(losses["bf16"], losses["plain"], strict=True)), losses


def test_long_context_bench_interleaves_the_objectives_for_step_times(tmp_path: Path) -> None:
    out = tmp_path / "time.json"
    cmd = [sys.executable, str(ROOT / "bench" / "long_context.py"), "--lengths", "32", "--steps", "2"]
    cmd += ["--threads", "1", "--checkpointing", "off", "--interleave", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in json.loads(out.read_text())["rows"] if r["attn"] == "sdpa"]  # flex: where it trains
    assert [r["objective"] for r in rows] == ["ar", "full", "block"]
    assert all(r["interleaved"] and "peak_gib" not in r for r in rows)
    assert rows[0]["step_vs_ar"] == 1.0 and rows[2]["step_vs_ar"] == rows[2]["step_s"] / rows[0]["step_s"]

"""Every size bounded before it is allocated: one row per way a file or a flag could ask for too much.

The rows follow tests/test_bad_inputs.py (same tiny world, same checks: a non-zero exit, one `error:` line
naming the field or option, no traceback, every file as it was) and add the environment a row runs in:
`ADAPT_MEMORY_LIMIT` caps the memory adapt plans on (a documented option for shared machines), so a row
can ask for more than a few MB instead of more than any machine has. Rows without it ask for petabytes.

Before this change an edited config.json made `from_pretrained` build 100000 layers (minutes, gigabytes)
or allocate a [384, 10^6] embedding before transformers' size-mismatch traceback; a huge block size or
--mc-samples allocated before a traceback; --gen-samples, --gen-steps and --gen-length were only read
after the whole ELBO pass. The rows marked `(already refused)` held before and stay as guards.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import test_bad_inputs
import torch
from test_bad_inputs import Case, adapter_for, check_one_error_line, finetune, tree
from typer.testing import CliRunner

from adapt.cli import app
from adapt.core import bounds
from adapt.core.errors import AdaptError

world = test_bad_inputs.world  # the same tiny world (src, ckpt, data.txt), built once for this module

P = 10**12  # asks for petabytes of any model: more than any machine


def edit(model: str = "ckpt", **fields: object) -> Callable[[Path], None]:
    """Edit `model`/config.json; a dotted key edits a nested block: edit(**{"diffusion.block_size": 0})."""

    def setup(w: Path) -> None:
        path = w / model / "config.json"
        config = json.loads(path.read_text())
        for key, value in fields.items():
            *parents, last = key.split(".")
            node = config
            for part in parents:
                node = node[part]
            node[last] = value
        path.write_text(json.dumps(config))

    return setup


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        for s in setups:
            s(w)

    return setup


@dataclass(frozen=True)
class Row(Case):
    env: tuple[tuple[str, str], ...] = ()
    """Environment of the command (ADAPT_MEMORY_LIMIT is unset unless a row sets it)."""


def limit(size: str) -> tuple[tuple[str, str], ...]:
    return ((bounds.MEMORY_LIMIT_ENV, size),)


SAMPLE = ("sample", "{w}/ckpt", "--prompt", "a", "--gen-length", "8")
EVAL = ("eval", "{w}/ckpt", "--data", "{w}/data.txt")
VERIFY = ("verify", "{w}/ckpt")
EDITS = [  # (what, edit, the words of the error)
    ("huge num_hidden_layers", edit(num_hidden_layers=100_000), "num_hidden_layers=100000"),
    ("huge vocab_size", edit(vocab_size=10**8), "vocab_size=100000000"),
    ("huge hidden_size", edit(hidden_size=10**6), "hidden_size=1000000"),
    ("huge intermediate_size", edit(intermediate_size=10**8), "intermediate_size=100000000"),
    ("huge block size", edit(**{"diffusion.block_size": 10**8}), "diffusion.block_size 100000000"),
    ("zero block size (already refused)", edit(**{"diffusion.block_size": 0}), "diffusion.block_size must"),
    ("negative block size (already refused)", edit(**{"diffusion.block_size": -4}), "diffusion.block_size"),
]
HUGE_CONTEXT = edit(max_position_embeddings=10 * P)
GEN = ("--gen-steps", "4")

ROWS = [
    *(Row(f"{c[0]}: {what}", c, says, setup) for what, setup, says in EDITS for c in (SAMPLE, EVAL, VERIFY)),
    # sizes a config.json cannot disprove (a RoPE model's context): bounded by memory
    Row("sample: huge max_position_embeddings, huge --gen-length",
        ("sample", "{w}/ckpt", "--prompt", "a", "--gen-length", str(P), "--steps", "1"),
        f"--gen-length {P} needs about", HUGE_CONTEXT),
    Row("eval: huge max_position_embeddings, huge --gen-length",
        (*EVAL, "--gen-steps", "1", "--gen-length", str(P)), f"--gen-length {P} needs about", HUGE_CONTEXT),
    # the weights are read through another directory or loader
    Row("sample: a LoRA adapter whose base has huge num_hidden_layers",
        ("sample", "{w}/adapter", "--prompt", "a"), "num_hidden_layers=100000",
        both(adapter_for("{w}/ckpt"), edit(num_hidden_layers=100_000))),
    Row("eval: an AR model with huge vocab_size", ("eval", "{w}/src", "--data", "{w}/data.txt"),
        "vocab_size=100000000", edit("src", vocab_size=10**8)),
    Row("convert: huge num_hidden_layers", ("convert", "{w}/src", "{w}/out"), "num_hidden_layers=100000",
        edit("src", num_hidden_layers=100_000)),
    Row("finetune: huge num_hidden_layers", finetune(), "num_hidden_layers=100000",
        edit(num_hidden_layers=100_000)),
    # eval flags
    Row("eval: huge --mc-samples", (*EVAL, "--mc-samples", str(P)), f"--mc-samples {P} x --seq-len 128"),
    Row("eval: --mc-samples over ADAPT_MEMORY_LIMIT, before any model loads",
        (*EVAL, "--mc-samples", "100000"), "1 window(s) needs about", env=limit("200MB")),
    Row("eval: --mc-samples over ADAPT_MEMORY_LIMIT for the real number of windows",
        (*EVAL, "--mc-samples", "10000"), "on 64 window(s) needs about 2.1 GB", env=limit("1GB")),
    Row("eval: huge --gen-samples", (*EVAL, *GEN, "--gen-samples", str(P)), f"--gen-samples {P}"),
    Row("eval: --gen-samples 0", (*EVAL, *GEN, "--gen-samples", "0"), "--gen-samples must be at least 1"),
    Row("eval: --gen-steps beyond the tokens generated", (*EVAL, "--gen-steps", "8,400"),
        "--gen-steps 400 with --gen-length 32"),
    Row("eval: --gen-steps not numbers", (*EVAL, "--gen-steps", "8,x"), "--gen-steps takes step counts"),
    Row("eval: --gen-length longer than the context", (*EVAL, *GEN, "--gen-length", "1000"),
        "--gen-length 1000 does not fit the context"),
    # sample flags: prompts x length
    Row("sample: prompts x --gen-length over ADAPT_MEMORY_LIMIT",
        ("sample", "{w}/ckpt", *["--prompt", "a"] * 64, "--gen-length", "200"),
        "64 prompt(s) x --gen-length 200 needs about", env=limit("10MB")),
    # recipes: batch x length
    Row("finetune: huge training.batch_size", finetune(f"training.batch_size={10**7}"),
        "needs about 328.2 GB: 327.7 GB for the decoder's last hidden states"),
    Row("finetune: a micro-batch over ADAPT_MEMORY_LIMIT", finetune(), "ADAPT_MEMORY_LIMIT allows",
        env=limit("2MB")),
    Row("sample: ADAPT_MEMORY_LIMIT is not a size", SAMPLE, "ADAPT_MEMORY_LIMIT='lots' is not a size",
        env=limit("lots")),
    Row("finetune: ADAPT_LOGITS_CHUNK is not a positive number", finetune(),
        "ADAPT_LOGITS_CHUNK='0' is not a positive whole number", env=(("ADAPT_LOGITS_CHUNK", "0"),)),
]  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_a_size_is_bounded_before_it_is_allocated(row: Row, world: Path, tmp_path: Path) -> None:
    w = tmp_path / "w"
    shutil.copytree(world, w)
    row.setup(w)
    before = tree(w)
    argv = [a.format(w=w) for a in row.argv]
    env = {"ADAPT_DEBUG": "", bounds.MEMORY_LIMIT_ENV: None, **dict(row.env)}
    result = CliRunner().invoke(app, argv, env=env)
    check_one_error_line(result, row.says)
    assert tree(w) == before


# ----------------------------------------------------------------------------- no false positives


def test_a_normal_checkpoint_still_samples_and_evaluates(world: Path) -> None:
    env = {bounds.MEMORY_LIMIT_ENV: None}
    sample = CliRunner().invoke(
        app, ["sample", str(world / "ckpt"), "--prompt", "a", "--gen-length", "8"], env=env
    )
    assert sample.exit_code == 0, sample.output
    # a batch size larger than the rows is no request for memory: the rows are the bound
    argv = ["eval", str(world / "ckpt"), "--data", str(world / "data.txt"), "--max-sequences", "4",
            "--batch-size", str(10**6), "--gen-steps", "2", "--gen-samples", "2",
            "--gen-length", "4"]  # fmt: skip
    evaluated = CliRunner().invoke(app, argv, env=env)
    assert evaluated.exit_code == 0, evaluated.output
    assert "gen ppl @ 2 steps" in evaluated.output


def llama_7b_headers(directory: Path) -> None:
    """A Llama-2-7B-shaped checkpoint of headers alone (two shards and an index; no tensor data)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, vocab_size=32000)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    directory.mkdir()
    config.save_pretrained(directory)
    names = list(model.state_dict().items())
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, tensors in shards.items():
        header = json.dumps(
            {n: {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [0, 0]} for n, t in tensors}
        )
        (directory / file).write_bytes(len(header).to_bytes(8, "little") + header.encode())
    index = {"weight_map": {n: file for file, tensors in shards.items() for n, _ in tensors}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_7b_checkpoint_passes_where_it_fits_and_is_refused_where_it_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llama_7b_headers(tmp_path / "7b")
    monkeypatch.setenv(bounds.MEMORY_LIMIT_ENV, "80GB")  # a big machine: as if it had that much free
    monkeypatch.setattr(bounds, "host_available", lambda: bounds.Memory(10**14, "of memory available"))
    weights = bounds.check_weights(tmp_path / "7b", torch.bfloat16, "cpu")
    assert weights is not None and weights.params == 6_738_415_616
    monkeypatch.setenv(bounds.MEMORY_LIMIT_ENV, "24GB")  # bf16 fits 24 GB, float32 does not
    bounds.check_weights(tmp_path / "7b", torch.bfloat16, "cpu")
    with pytest.raises(
        AdaptError, match=r"needs about 27\.0 GB for the weights \(6,738,415,616 parameters x 4"
    ):
        bounds.check_weights(tmp_path / "7b", torch.float32, "cpu")


def test_a_config_with_fewer_layers_than_the_weights_loads() -> None:
    """Extra layers in the weights (multi-token-prediction heads) are skipped by transformers: no refusal."""
    from adapt.tiny import tiny_config

    config = tiny_config("llama", vocab_size=320)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        shapes = {n: tuple(t.shape) for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    shapes["model.layers.2.mtp.weight"] = (64,)
    bounds.check_config_matches(config, bounds.Weights(shapes, 0, 0), "x")


# ----------------------------------------------------------------------------- the pieces


def test_sizes_read_and_written() -> None:
    assert bounds.parse_size("8GB") == 8 * 10**9
    assert bounds.parse_size("2GiB") == 2 * 2**30
    assert bounds.parse_size(" 512 mb ") == 512 * 10**6
    assert bounds.parse_size("1.5T") == 15 * 10**11
    assert bounds.parse_size("4096") == 4096
    for text in ("lots", "-1GB", "0", "8XB", ""):
        with pytest.raises(AdaptError, match="ADAPT_MEMORY_LIMIT"):
            bounds.parse_size(text)
    assert (
        bounds.size(38.2e9) == "38.2 GB" and bounds.size(512) == "512 bytes" and bounds.size(3e15) == "3.0 PB"
    )


def test_the_memory_limit_caps_what_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(bounds.MEMORY_LIMIT_ENV, raising=False)
    found = bounds.available_memory("cpu")
    assert found is not None and found.bytes > 0 and not found.limited
    monkeypatch.setenv(bounds.MEMORY_LIMIT_ENV, "1MB")
    assert bounds.available_memory("cpu") == bounds.Memory(10**6, "ADAPT_MEMORY_LIMIT allows", limited=True)
    monkeypatch.setenv(bounds.MEMORY_LIMIT_ENV, "1PB")  # a cap: never more than there is
    assert not bounds.available_memory("cpu").limited


def test_memory_already_held_counts_against_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bounds.MEMORY_LIMIT_ENV, "10MB")
    term = bounds.Term("the noisy copies", 6 * 10**6, "n x 26 bytes")
    bounds.check_fits("--x 1", [term], "cpu", "lower --x")
    with pytest.raises(
        AdaptError, match=r"--x 1 needs about 6\.0 MB .* more than the 4\.0 MB ADAPT_MEMORY_LIMIT"
    ):
        bounds.check_fits("--x 1", [term], "cpu", "lower --x", held=6 * 10**6)


def test_an_unreadable_header_is_left_to_the_loader(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((10**15).to_bytes(8, "little") + b"{}")  # a petabyte header
    assert bounds.read_weights(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    assert bounds.read_weights(tmp_path) is None


def test_the_elbo_noise_is_sized_by_the_window_whatever_the_block() -> None:
    """Each token's t is its block's, read by index: a block longer than the window allocates nothing more
    (it was repeated block times, then cut)."""
    from adapt.core.checkpoint import DiffusionSettings
    from adapt.evaluation.evaluate import elbo_noise

    windows = torch.arange(16).view(2, 8)
    for block in (3, P):
        settings = DiffusionSettings(mask_token_id=99, block_size=block)
        _, _, t, _ = elbo_noise(windows, settings, 2, generator=torch.Generator().manual_seed(0))
        assert t.shape == (4, 8)
        if block == 3:  # tokens of one block share its t
            assert (
                (t[:, 0:3] == t[:, :1]).all()
                and (t[:, 3:6] == t[:, 3:4]).all()
                and (t[:, 6:] == t[:, 6:7]).all()
            )


def test_a_gpu_and_the_host_are_counted_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA, device terms go against the device's free memory, host terms (the ELBO's noisy copies,
    the weights read through the host) against the host's."""
    monkeypatch.delenv(bounds.MEMORY_LIMIT_ENV, raising=False)
    monkeypatch.setattr(bounds, "cuda_free", lambda device: bounds.Memory(10**9, f"free on {device}"))
    monkeypatch.setattr(bounds, "host_available", lambda: bounds.Memory(10**10, "of memory available"))
    logits, copies = bounds.logits_term(1, 1000, 100_000), bounds.noisy_copies_term(100, 1000, 128)
    bounds.check_fits("--x", [logits, copies], "cuda:0", "lower --x")  # 0.4 GB on the GPU, 0.3 GB on the host
    with pytest.raises(
        AdaptError, match=r"needs about 4\.0 GB for the logits .* more than the 1\.0 GB free on cuda:0"
    ):
        bounds.check_fits("--x", [bounds.logits_term(10, 1000, 100_000), copies], "cuda:0", "lower --x")
    with pytest.raises(
        AdaptError, match=r"for the noisy copies .* more than the 10\.0 GB of memory available"
    ):
        bounds.check_fits("--x", [logits, bounds.noisy_copies_term(10_000, 1000, 128)], "cuda:0", "lower --x")


def test_a_containers_limit_caps_the_host_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a cgroup v2 container: its memory.max less what it holds beyond the file cache it can drop."""
    (tmp_path / "memory.max").write_text("8000000000\n")
    (tmp_path / "memory.current").write_text("5000000000\n")
    (tmp_path / "memory.stat").write_text("anon 2000000000\nfile 3000000000\n")
    monkeypatch.setattr(bounds, "CGROUP", tmp_path)
    assert bounds.host_available().bytes <= 6 * 10**9  # 8 GB less 2 GB held (3 GB of cache can go)
    (tmp_path / "memory.stat").write_text("anon 5000000000\nfile 0\n")
    assert bounds.host_available().bytes == 3 * 10**9  # less than any host this runs on has free
    (tmp_path / "memory.max").write_text("max\n")  # no limit
    assert bounds.host_available().bytes > 3 * 10**9

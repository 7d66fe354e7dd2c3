"""Memory per GPU of each engine for full and LoRA fine-tuning, from parameter, gradient and optimizer bytes.

python bench/memory_per_gpu.py [--gpus 8] [--lora-r 16]

adapt trains float32 weights under bf16 autocast with AdamW: 4 bytes of weights, 4 of gradients and 8 of
optimizer state (two moments) per trained parameter; a frozen parameter (LoRA's base) costs its 4 bytes of
weights only. Per GPU, over N GPUs:

    DDP      weights + grads + optimizer, all replicated          16 B/param
    ZeRO-2   weights replicated, grads and optimizer sharded      4 + 12/N B/param
    FSDP2 / ZeRO-3  everything sharded                            16/N B/param (+ one gathered layer)

Host memory per rank while the weights load (adapt/training/placement.py), W = 4 B/param in float32:

    DDP, ZeRO-0/1/2, or a whole load       W on every rank (so N x W on a node of N ranks)
    FSDP2 (rank 0 + broadcast)             rank 0: W + W/N; ranks > 0: W/N
    ZeRO-3 (zero.Init)                     rank 0: W (the files it reads) + W/N; ranks > 0: W/N

Sharded loading needs a converted checkpoint (`adapt convert` first); an AR model converted in memory
loads whole. The joint objective's frozen AR teacher (`diffusion.ar_teacher`) adds its weights in the
step's precision (2 B/param in bf16): whole under DDP and ZeRO-2, 1/N under FSDP2 and ZeRO-3.
Activations (which grow with batch x length, and double for the block objective's [x_t ; x_0] pass) and
the CUDA context (~0.5-1 GiB) come on top. Parameter counts are computed from
each model's published dimensions (embeddings tied or not); LoRA adapts every linear layer of the
decoder blocks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 1024**3
ADAMW_FP32 = 16  # bytes per trained parameter: weights 4, gradients 4, two AdamW moments 8


@dataclass(frozen=True)
class Dims:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int | None = None


MODELS = [
    Dims("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, tied=True),
    Dims("Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, tied=True),
    Dims("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, tied=False),
]


def linear_shapes(d: Dims) -> list[tuple[int, int]]:
    """(in, out) of the linear layers of one decoder block (LLaMA-style: q, k, v, o, gate, up, down)."""
    hd = d.head_dim or d.hidden // d.heads
    q, kv = d.heads * hd, d.kv_heads * hd
    h, i = d.hidden, d.intermediate
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def parameters(d: Dims) -> int:
    """Weights of a LLaMA-style model (biases ignored): embeddings, blocks with two norms, final norm."""
    block = sum(a * b for a, b in linear_shapes(d)) + 2 * d.hidden
    embed = d.vocab * d.hidden * (1 if d.tied else 2)
    return embed + d.layers * block + d.hidden


def lora_parameters(d: Dims, r: int) -> int:
    """LoRA A and B of every linear layer in the blocks, plus the trained mask-token embedding row."""
    return d.layers * sum(r * (a + b) for a, b in linear_shapes(d)) + d.hidden


def bytes_per_gpu(total: int, trained: int, engine: str, gpus: int) -> float:
    """Weights of every parameter plus gradients and AdamW state of the trained ones, on one GPU."""
    frozen = total - trained
    if engine == "DDP":
        return ADAMW_FP32 * trained + 4 * frozen
    if engine == "ZeRO-2":
        return 4 * total + (ADAMW_FP32 - 4) * trained / gpus
    if engine in ("FSDP2", "ZeRO-3"):
        return (ADAMW_FP32 * trained + 4 * frozen) / gpus
    raise ValueError(engine)


def host_bytes_loading(total: int, engine: str, gpus: int, rank0: bool) -> float:
    """Host memory of one rank while float32 weights load: whole, or its 1/N (+ the whole on rank 0)."""
    weights = 4 * total
    if engine in ("DDP", "ZeRO-2"):
        return weights
    if engine in ("FSDP2", "ZeRO-3"):
        return weights / gpus + (weights if rank0 else 0)
    raise ValueError(engine)


def teacher_bytes_per_gpu(total: int, engine: str, gpus: int) -> float:
    """A frozen AR teacher of `total` parameters in bf16 (the joint objective's `diffusion.ar_teacher`
    under bf16 mixed precision): whole on every GPU, or its 1/N where the engine shards the model."""
    if engine in ("DDP", "ZeRO-2"):
        return 2 * total
    if engine in ("FSDP2", "ZeRO-3"):
        return 2 * total / gpus
    raise ValueError(engine)


def table(gpus: int, r: int) -> str:
    engines = ["DDP", "ZeRO-2", "FSDP2", "ZeRO-3"]
    head = "| model | params | fine-tuning | " + " | ".join(f"{e} ({gpus} GPUs)" for e in engines) + " |"
    rows = [head, "|---|---|---|" + "---|" * len(engines)]
    for d in MODELS:
        n = parameters(d)
        for label, trained in (("full", n), (f"LoRA r={r}", lora_parameters(d, r))):
            cells = [f"{bytes_per_gpu(n, trained, e, gpus) / GIB:.2f} GiB" for e in engines]
            rows.append(f"| {d.name} | {n / 1e9:.2f}B | {label} | " + " | ".join(cells) + " |")
    rows += ["", f"| model | host while loading, per rank ({gpus} GPUs) | DDP, ZeRO-2 | FSDP2, ZeRO-3 |",
             "|---|---|---|---|"]  # fmt: skip
    for d in MODELS:
        n = parameters(d)
        whole = host_bytes_loading(n, "DDP", gpus, rank0=True) / GIB
        first, other = (host_bytes_loading(n, "ZeRO-3", gpus, rank0) / GIB for rank0 in (True, False))
        rows.append(
            f"| {d.name} | rank 0 / others | {whole:.2f} / {whole:.2f} GiB | {first:.2f} / {other:.2f} GiB |"
        )
    rows += ["", f"| model | + an AR teacher of its size, bf16 ({gpus} GPUs) | DDP, ZeRO-2 | FSDP2, ZeRO-3 |",
             "|---|---|---|---|"]  # fmt: skip
    for d in MODELS:
        whole, shard = (teacher_bytes_per_gpu(parameters(d), e, gpus) / GIB for e in ("DDP", "FSDP2"))
        rows.append(f"| {d.name} | per GPU | {whole:.2f} GiB | {shard:.2f} GiB |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--lora-r", type=int, default=16)
    args = ap.parse_args()
    print(table(args.gpus, args.lora_r))


if __name__ == "__main__":
    main()

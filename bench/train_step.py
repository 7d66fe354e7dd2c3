"""Tokens/s of the diffusion training step vs the same model's plain causal-LM step, in one run.

python bench/train_step.py                      # llama-like, hidden 256, 4 layers, seq 256, batch 8
python bench/train_step.py --vocab 32000 --steps 20 --threads 2

Both steps run the same architecture and weights with AdamW: the AR step is stock transformers
(`model(input_ids, labels=input_ids).loss`, causal attention); the diffusion step is adapt's
(`adapt.training.objectives.masked.noise_batch` + `TokenLoss`: t, masking, bidirectional attention,
LM head on the masked positions only, 1/t-weighted loss). The two are timed in interleaved rounds
and the median step time of each is reported. The diffusion step with full [b, l, V] logits is
timed too, to show what computing the head only where the loss lives buys, and so is the block-diffusion
step (`adapt.training.objectives.block`, --block tokens per block): one pass over [x_t ; x_0], twice the
tokens.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch


def build(vocab: int, hidden: int, layers: int, seq: int, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from adapt.tiny import tiny_config

    config = tiny_config("llama", vocab_size=vocab, hidden=hidden, layers=layers, max_position_embeddings=seq)
    config.num_attention_heads, config.num_key_value_heads = hidden // 64, hidden // 64
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()


def ar_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def diffusion_step(loss_module, opt, ids: torch.Tensor, step: int, objective) -> float:  # noqa: ANN001
    gen = torch.Generator().manual_seed(step)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs = objective.inputs(batch, step, gen, torch.float32)
    loss, _, _ = loss_module(**inputs)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def timed(fn: Callable[[int], float], start: int, n: int) -> list[float]:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(start + i)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--block", type=int, default=32, help="block size of the block-diffusion step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from adapt.core.checkpoint import DiffusionSettings
    from adapt.training.config import DiffusionConfig
    from adapt.training.objectives import make_objective
    from adapt.training.objectives.loss import TokenLoss

    ar = build(args.vocab, args.hidden, args.layers, args.seq)
    diff_model = copy.deepcopy(ar)
    diff_model.config.is_causal = False
    settings = DiffusionSettings(mask_token_id=args.vocab - 1, shift=True)
    masked = make_objective(DiffusionConfig(low_discrepancy=True), settings)
    block = make_objective(DiffusionConfig(low_discrepancy=True, block_size=args.block), settings)
    fast = TokenLoss(diff_model, fast=True)
    full = TokenLoss(diff_model, fast=False)
    opts = {"ar": torch.optim.AdamW(ar.parameters(), lr=1e-4)}
    opts["diff"] = torch.optim.AdamW(diff_model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab - 1, (args.batch, args.seq), generator=gen)

    variants = {
        "causal LM (HF labels=)": lambda s: ar_step(ar, opts["ar"], ids),
        "diffusion (adapt)": lambda s: diffusion_step(fast, opts["diff"], ids, s, masked),
        "diffusion, full logits": lambda s: diffusion_step(full, opts["diff"], ids, s, masked),
        f"block diffusion, B={args.block}": lambda s: diffusion_step(fast, opts["diff"], ids, s, block),
    }
    for fn in variants.values():
        timed(fn, 0, args.warmup)
    times: dict[str, list[float]] = {name: [] for name in variants}
    per_round = max(1, args.steps // args.rounds)
    for r in range(args.rounds):
        for name, fn in variants.items():
            times[name] += timed(fn, 1000 * (r + 1), per_round)
    tokens = args.batch * args.seq
    rates = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    print(
        f"llama-like: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, seq {args.seq}, "
        f"batch {args.batch}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{per_round * args.rounds} timed steps each (median)"
    )
    base = rates["causal LM (HF labels=)"]
    for name, rate in rates.items():
        print(f"  {name:<24} {rate:10.0f} tokens/s   ratio to causal LM {rate / base:5.2f}")
    ratio = rates["diffusion (adapt)"] / base
    print(f"diffusion / causal-LM training tokens/s: {ratio:.2f} (target >= 0.9)")
    block_ratio = rates[f"block diffusion, B={args.block}"] / base
    print(f"block diffusion / causal-LM training tokens/s: {block_ratio:.2f} (one pass over 2l tokens)")


if __name__ == "__main__":
    main()

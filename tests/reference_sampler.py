"""A deliberately plain, slow LLaDA low-confidence remasking loop, sharing no code with adapt.sampling.

One prompt at a time, a full forward pass per step, no cache, greedy. Used by the tests (the engine must
give identical tokens) and by bench/sample_speed.py (the baseline it must beat).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def reference_generate(
    model,
    prompt_ids: list[int],
    mask_id: int,
    shift: bool,
    gen_length: int,
    steps: int,
    block_length: int,
    vocab_size: int,
) -> list[int]:
    """Greedy LLaDA sampling of `gen_length` tokens after `prompt_ids`; returns the generated ids.

    Never picks the mask token or an embedding row beyond the tokenizer (`vocab_size`).
    """
    x = torch.tensor([list(prompt_ids) + [mask_id] * gen_length])
    p = len(prompt_ids)
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for b in range(num_blocks):
        lo = p + b * block_length
        hi = lo + block_length
        n_masked = int((x[0, lo:hi] == mask_id).sum())
        counts = [n_masked // steps_per_block] * steps_per_block
        for i in range(n_masked % steps_per_block):
            counts[i] += 1
        for k in counts:
            logits = model(input_ids=x).logits[0].float()  # [l, V]
            if shift:
                logits = torch.cat([logits[:1], logits[:-1]])  # prediction for j sits at j - 1
            logits[:, mask_id] = float("-inf")
            logits[:, vocab_size:] = float("-inf")
            x0 = logits.argmax(-1)  # [l]
            conf = torch.softmax(logits, -1).gather(-1, x0[:, None])[:, 0]  # [l]
            conf[:lo] = float("-inf")
            conf[hi:] = float("-inf")
            conf[x[0] != mask_id] = float("-inf")
            chosen = torch.topk(conf, k).indices
            x[0, chosen] = x0[chosen]
    return x[0, p:].tolist()

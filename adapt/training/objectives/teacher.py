"""The joint objective's teacher (`diffusion.ar_teacher`): an AR causal LM whose next-token distributions
the clean stream is trained to match.

The AR term on a corpus of the source's own greedy text trains the clean stream towards those one-hot
targets, which sharpens it away from the source (adapt's first joint model: held-out perplexity 1.31x the
source's). Against the teacher's full distribution the term is KL(teacher || model) per target, zero on
the unchanged converted model, so it holds the AR stream where the source is while the diffusion term
trains the shared weights. The teacher runs frozen, without gradients, once per micro-batch on the clean
tokens (causal, padding and packed documents respected) and its head only at the AR term's positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapt.core.checkpoint import read_settings
from adapt.core.errors import AdaptError
from adapt.training.objectives.loss import head_logits


@dataclass
class Teacher:
    """A frozen AR model and the width of the student's logits (its vocabulary plus the mask row)."""

    model: nn.Module
    width: int

    @torch.no_grad()
    def probabilities(
        self,
        batch: dict[str, torch.Tensor],
        positions: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
    ) -> torch.Tensor:
        """Next-token probabilities read at clean columns (rows, cols) of the batch [b, l]: the teacher's
        prediction of the token after each, zero on the student's rows the teacher lacks. -> [n, width]"""
        ids, am, segments = batch["input_ids"], batch["attention_mask"], batch.get("segment_ids")
        # packed documents need their own [l, l] pattern; otherwise the model's causal mask over the
        # padding mask is the source's attention (sdpa then needs no dense mask at all when unpadded)
        mask = am if segments is None else causal_pattern(am, segments)
        kwargs = {"attention_mask": mask, "position_ids": positions}
        decoder = self.model.get_decoder()
        if decoder is self.model:  # no separate decoder: the whole model, its logits read at (rows, cols)
            logits = self.model(input_ids=ids, use_cache=False, **kwargs).logits[rows, cols]
        else:
            hidden = decoder(input_ids=ids, use_cache=False, **kwargs).last_hidden_state
            logits = head_logits(self.model, hidden[rows, cols])
        probs = logits.float().softmax(-1)  # [n, V_teacher]
        return torch.nn.functional.pad(probs, (0, self.width - probs.shape[-1]))


def causal_pattern(attention_mask: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """The AR source's attention over a batch: causal, real keys, own document. -> bool [b, 1, l, l]"""
    length = attention_mask.shape[-1]
    keys = attention_mask.bool()[:, None, :]
    allowed = torch.ones(length, length, dtype=torch.bool, device=keys.device).tril()[None] & keys
    if segments is not None:
        allowed = allowed & (segments[:, :, None] == segments[:, None, :])
    eye = torch.eye(length, dtype=torch.bool, device=keys.device)  # padding queries stay finite
    return (allowed | eye)[:, None]


def load_teacher(path: str, tokenizer: Any, student: nn.Module, device: Any, dtype: torch.dtype) -> Teacher:
    """The frozen teacher in `dtype` on `device`, refused in one line unless it is an AR causal LM whose
    tokens are the student's (same ids) and whose vocabulary fits in the student's logits."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = Path(path).expanduser()
    if not (where / "config.json").is_file():
        raise AdaptError(f"diffusion.ar_teacher: no AR model at {where} (no config.json)")
    config = AutoConfig.from_pretrained(where)
    if read_settings(config) is not None:
        raise AdaptError(
            f"diffusion.ar_teacher: {where} is a diffusion checkpoint; the teacher is an AR causal LM "
            "(usually the source model.path was converted from)"
        )
    ours = tokenizer.get_vocab()
    theirs = AutoTokenizer.from_pretrained(where).get_vocab()
    differ = [t for t, i in theirs.items() if ours.get(t) != i]
    if differ:
        raise AdaptError(
            f"diffusion.ar_teacher: {where} has another tokenizer ({len(differ)} tokens differ, e.g. "
            f"{differ[0]!r}); the teacher must share the model's token ids"
        )
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa")
    head = student.get_output_embeddings().weight
    width = getattr(head, "ds_shape", head.shape)[0]  # ZeRO-3 partitions keep their whole shape here
    if model.config.vocab_size > width:
        raise AdaptError(
            f"diffusion.ar_teacher: {where} predicts {model.config.vocab_size} tokens, more than the "
            f"model's {width}"
        )
    model.requires_grad_(False)
    return Teacher(model.to(device).eval(), width)


def teacher_dtype(mixed_precision: str, student: nn.Module) -> torch.dtype:
    """The teacher computes in the step's precision: the autocast dtype, else the student's weights'."""
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return autocast or next(student.parameters()).dtype

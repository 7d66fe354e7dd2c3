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

from adapt.core.attention import causal_documents_allowed
from adapt.core.checkpoint import read_settings
from adapt.core.errors import AdaptError
from adapt.training.objectives.loss import (
    TokenLoss,
    agreed_rows,
    causal_lm_of,
    check_fast_path,
    chunk_spans,
    head_logits,
    head_rows,
)


class ProbabilitiesAt(TokenLoss):
    """A frozen model whose forward is its next-token probabilities at chosen positions, padded with zeros
    to `width` columns: an engine that shards it (FSDP2, ZeRO-3) gathers its weights around each call
    through its forward hooks. The logits are computed a chunk of rows at a time (`chunk_spans`), so only
    the probabilities are whole."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        rows: torch.Tensor,
        cols: torch.Tensor,
        width: int,
    ) -> torch.Tensor:
        if not self.fast:
            return padded_softmax(self.logits_at(input_ids, attention_mask, position_ids, rows, cols), width)
        lm = causal_lm_of(self.model)
        hidden = self.hidden_at(input_ids, attention_mask, position_ids, rows, cols)  # [n, h]
        n = len(hidden)
        out = hidden.new_zeros(n, width, dtype=torch.float32)
        for a, b in chunk_spans(n, agreed_rows(n, lm, hidden.device), lm):
            logits = head_logits(lm, hidden[a:b]).float()
            out[a:b, : logits.shape[-1]] = logits.softmax(-1)
        return out


def padded_softmax(logits: torch.Tensor, width: int) -> torch.Tensor:
    probs = logits.float().softmax(-1)  # [n, V_teacher]
    return torch.nn.functional.pad(probs, (0, width - probs.shape[-1]))


@dataclass
class Teacher:
    """A frozen AR model (wrapped for its logits at chosen positions), the width of the student's logits
    (its vocabulary plus the mask row), and the engine that shards it, if one does (kept alive with it)."""

    scorer: ProbabilitiesAt
    width: int
    engine: Any = None

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
        am, segments = batch["attention_mask"], batch.get("segment_ids")
        # packed documents need their own [l, l] pattern; otherwise the model's causal mask over the
        # padding mask is the source's attention (sdpa then needs no dense mask at all when unpadded)
        mask = am if segments is None else causal_documents_allowed(am, segments)
        return self.scorer(batch["input_ids"], mask, positions, rows, cols, self.width)


def load_teacher(
    path: str,
    tokenizer: Any,
    student: nn.Module,
    device: Any,
    dtype: torch.dtype,
    probe_ids: list[int],
    empty: bool = False,
) -> Teacher:
    """The frozen teacher in `dtype` on `device`, refused in one line unless it is an AR causal LM whose
    tokens are the student's (same ids) and whose vocabulary fits in the student's logits. `empty`: its
    parameters on the meta device (nothing read; an engine fills them), and no fast-path probe. Under an
    active zero.Init it is built partitioned, and the probe waits for its engine too."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    where = check_teacher(path, tokenizer)
    if empty:
        with init_empty_weights():  # buffers (rotary frequencies) are computed as usual
            config = AutoConfig.from_pretrained(where)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        model.tie_weights()
    else:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa")
    width = head_rows(student)
    if model.config.vocab_size > width:
        raise AdaptError(
            f"diffusion.ar_teacher: {where} predicts {model.config.vocab_size} tokens, more than the "
            f"model's {width}"
        )
    model.requires_grad_(False)
    whole = not empty and not is_deepspeed_zero3_enabled()
    model = (model.to(device) if whole else model).eval()
    return Teacher(ProbabilitiesAt(model, fast=whole and check_fast_path(model, probe_ids)), width)


def check_teacher(path: str, tokenizer: Any) -> Path:
    """`diffusion.ar_teacher`'s folder, refused in one line unless it holds an AR causal LM whose tokens
    are the student's (same ids)."""
    from transformers import AutoConfig, AutoTokenizer

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
    return where


def teacher_dtype(mixed_precision: str, student: nn.Module) -> torch.dtype:
    """The teacher computes in the step's precision: the autocast dtype, else the student's weights'."""
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return autocast or next(student.parameters()).dtype

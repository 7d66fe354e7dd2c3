"""Diffusion decoding: `generate(model, tokenizer, prompts, SamplingConfig(...)) -> GenerationOutput`."""

from adapt.sampling.config import GenerationOutput, SamplingConfig
from adapt.sampling.engine import StepEvent, generate

__all__ = ["GenerationOutput", "SamplingConfig", "StepEvent", "generate"]

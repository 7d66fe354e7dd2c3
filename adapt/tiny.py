"""Tiny random causal LMs with a real trained tokenizer, built offline in seconds.

Used by the tests, the benchmarks and the offline smoke job. Every architecture is a stock
transformers config; nothing here is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SAMPLE_TEXT = """\
The river ran slowly past the old mill, and the miller's daughter watched the water turn the wheel.
Every morning she counted the sacks of grain and wrote the numbers in a small green book.
In the spring the fields were full of barley, and in the autumn the barns were full of bread.
A traveller came to the mill one evening and asked for a room, a meal and a place by the fire.
He told stories of cities by the sea, of ships with white sails and markets that never closed.
The daughter listened and wrote his stories in the green book beside the numbers of the grain.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
Question: what is two plus three? Answer: five.
Question: what colour is the sky on a clear day? Answer: blue.
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2", "olmo2", "phi3", "granite")


def build_tokenizer(vocab_size: int = 320, text: str = SAMPLE_TEXT) -> Any:
    """A byte-level BPE tokenizer trained on `text`, with BOS/EOS/PAD and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, **overrides: Any) -> Any:
    """A stock transformers config of `arch`, scaled down to a few hundred thousand parameters."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if arch == "gpt2":
        kw: dict[str, Any] = dict(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256)
    else:
        kw = dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        if arch in ("qwen3", "gemma"):
            kw["head_dim"] = hidden // 4
        if arch == "mistral":
            kw["sliding_window"] = None
    kw.update(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def build_tiny_model(
    arch: str, out: str | Path, spare_rows: int = 0, seed: int = 0, **overrides: Any
) -> Path:
    """Save a random tiny `arch` causal LM and its tokenizer to `out`; returns `out`.

    `spare_rows` > 0 gives the embedding matrix unused rows beyond the tokenizer (as Qwen has).
    """
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer) + spare_rows, **overrides)
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

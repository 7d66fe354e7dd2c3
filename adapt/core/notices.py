"""Library notices that say nothing to an adapt user, kept out of its output (logging filters only).

- Accelerate warns at every checkpoint that it dropped a tied copy (lm_head = embeddings) from the
  state dict; loading re-ties it.
- DeepSpeed, once installed, is imported by transformers' model loading in every command and prints to
  stdout that it found no GPU ("Setting accelerator to CPU ..."), also where it never runs.
"""

from __future__ import annotations

import logging

DROPPED = {
    "accelerate.utils.other": "Removed shared tensor",
    "DeepSpeed": "Setting accelerator to CPU",
}


class Drop(logging.Filter):
    """Drop the records whose message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet() -> None:
    """Attach the filters (once; the loggers need not exist yet: getLogger creates and keeps them)."""
    for name, text in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, Drop) and f.text == text for f in logger.filters):
            logger.addFilter(Drop(text))

"""Stage 1, conversion: a pretrained causal LM becomes a masked-diffusion checkpoint (`convert`), checked
against its source and, once saved, on its own (`verify`)."""

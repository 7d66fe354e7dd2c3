"""Publishing: a diffusion checkpoint or LoRA adapter export goes to the Hugging Face Hub with a
generated model card (`hub`)."""

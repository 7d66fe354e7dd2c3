"""Stage 2, training: diffusion fine-tuning of a converted (or converted on the fly) model over Accelerate.

The recipe (`config`), its data (`data`), objectives (`objectives/`), LoRA (`lora`), the distributed
engine (`engine`); a run is `setup` -> `loop.fit` -> `export`, glued by `run.run`, with its `checkpoints`,
`metrics`, `signals` and held-out evaluation (`heldout`) in modules of their own.
"""

"""`adapt gguf CKPT OUT.gguf`: a full-attention diffusion checkpoint as a GGUF for llama.cpp.

    adapt gguf out/tiny-diffusion out/tiny.gguf
    adapt gguf out/smollm2-diffusion out/smollm2-q8.gguf --type q8_0 --force
    llama-diffusion-cli -m out/tiny.gguf -p "The river" -ub 64 --diffusion-block-length 32 \\
        --diffusion-steps 32

Only typer is imported here, so that `adapt --help` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer


def gguf_cmd(
    checkpoint: Annotated[
        str, typer.Argument(help="Full-attention diffusion checkpoint (a local directory).")
    ],
    out: Annotated[str, typer.Argument(help="The GGUF file to write.")],
    type: Annotated[  # noqa: A002 - the option is --type
        str, typer.Option("--type", help="Weight type: f32, f16 or q8_0 (norms and biases stay f32).")
    ] = "f32",
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Write CHECKPOINT as a GGUF for llama.cpp's llama-diffusion-cli (llama -> LLaDA, qwen2 -> Dream)."""
    from adapt.publishing.gguf import write_gguf

    path = write_gguf(checkpoint, out, type, force)
    typer.echo(f"wrote {path}")

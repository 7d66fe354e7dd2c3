"""`adapt serve CKPT`: bind the address, load the checkpoint, decode requests in batches, run uvicorn.

    adapt serve out/tiny-diffusion --port 8000
    ADAPT_API_KEY=secret adapt serve NAMESPACE/NAME --host 0.0.0.0 --max-batch 16
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "out/tiny-diffusion", "prompt": "The river", "max_tokens": 16}'

Only typer is imported here, so that `adapt --help` stays fast; FastAPI and uvicorn are checked for first.
"""

from __future__ import annotations

import socket
from typing import Annotated

import typer

from adapt.core.errors import AdaptError, first_line

ROUNDING_NOTE = (
    "note: in {} a batched row can differ from its answer alone where rounding flips a near tie "
    "(padding changes the shapes); --dtype float32 or --max-batch 1 for answers independent of batching"
)
FALLBACK_CONTEXT = 4096
"""The longest prompt + output served when the model's config names no context length."""


def serve_cmd(
    checkpoint: Annotated[
        str, typer.Argument(help="Diffusion checkpoint: a local directory or a Hub id (NAMESPACE/NAME).")
    ],
    revision: Annotated[
        str | None, typer.Option(help="Hub revision (branch, tag or commit) when CHECKPOINT is a Hub id.")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on: 127.0.0.1 serves this machine only; 0.0.0.0 all.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: a free one, printed).")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="ADAPT_API_KEY",
            show_default=False,
            help="Require `Authorization: Bearer KEY` on every route but /health (better set ADAPT_API_KEY: "
            "a command line is visible to other users).",
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="The model id clients name (default: CHECKPOINT as given).")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, max=1024, help="Rows decoded together at most.")] = 8,
    batch_window: Annotated[
        float,
        typer.Option(min=0.0, max=10.0, help="Seconds a request waits for others to share its batch."),
    ] = 0.01,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="max_tokens of a request that gives none (cut to the context).")
    ] = 128,
    max_body: Annotated[
        int, typer.Option(min=1024, help="Largest request body read, in bytes (larger: 413).")
    ] = 4 * 1024 * 1024,
    dtype: Annotated[
        str,
        typer.Option(
            help="auto (bfloat16 where the device multiplies it natively, else float32), float32, "
            "bfloat16, float16 or checkpoint (its saved dtype)."
        ),
    ] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda if available).")] = None,
) -> None:
    """Serve a diffusion checkpoint over the OpenAI API: /v1/completions, /v1/chat/completions (streamed
    with `stream: true`), /v1/models, /health. Diffusion settings (strategy, steps, block_length,
    threshold, cache, ...) are extra request fields."""
    serve(
        checkpoint,
        revision,
        host,
        port,
        api_key,
        model_name,
        max_batch,
        batch_window,
        max_tokens,
        max_body,
        dtype,
        device,
    )


def serve(
    checkpoint: str,
    revision: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch: int = 8,
    batch_window: float = 0.01,
    max_tokens: int = 128,
    max_body: int = 4 * 1024 * 1024,
    dtype: str = "auto",
    device: str | None = None,
) -> None:
    """Run the server until interrupted. Refused with one line: a missing extra, a checkpoint that is not
    a diffusion one, an address that cannot be listened on (before any weights are read)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as e:
        needs = f"adapt serve needs FastAPI and uvicorn ({first_line(e)})"
        raise AdaptError(f"{needs}: pip install 'adapt[serve]'") from None
    from adapt.core.boundary import resolve_device
    from adapt.core.bounds import context_length
    from adapt.core.checkpoint import load_settings
    from adapt.core.locate import locate
    from adapt.loading.model import load_diffusion_model
    from adapt.loading.precision import weights_dtype
    from adapt.serving.api import Served
    from adapt.serving.app import build_app
    from adapt.serving.batcher import Batcher

    if api_key is not None and not api_key.strip():
        raise AdaptError("--api-key (or ADAPT_API_KEY) is empty; give a key or leave it out")
    where = locate(checkpoint, revision)
    load_settings(where)  # not a diffusion checkpoint: refused before the port and the weights
    device = resolve_device(device)
    chosen, why = weights_dtype(dtype, device)
    dtype_name = "checkpoint" if chosen == "auto" else str(chosen).removeprefix("torch.")
    sock = listen(host, port)
    try:
        typer.echo(f"{checkpoint} on {device} in {dtype_name} ({why})", err=True)
        model, tokenizer, settings = load_diffusion_model(where, dtype=dtype_name, device=device)
        if max_batch > 1 and str(model.dtype) != "torch.float32":
            typer.echo(ROUNDING_NOTE.format(str(model.dtype).removeprefix("torch.")), err=True)
        context = context_length(model.config) or FALLBACK_CONTEXT
        served = Served(model_name or str(checkpoint), tokenizer, settings, context, max_tokens, max_batch)
        batcher = Batcher(model, tokenizer, settings, max_batch, batch_window)
        batcher.start()
        app = build_app(served, batcher, api_key, max_body)
        address, bound = sock.getsockname()[:2]
        shown = f"[{address}]" if ":" in address else address
        secured = "API key required" if api_key else "no API key"
        typer.echo(f"serving {served.name} at http://{shown}:{bound}/v1 ({secured})")
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
        batcher.stop()
    finally:
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line saying why not (in use, no such address)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        raise AdaptError(f"--host {host}: not an address this machine can listen on ({e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as e:
        sock.close()
        raise AdaptError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock

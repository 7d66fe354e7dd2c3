"""The `adapt` console command. Each subcommand is a thin wrapper over a library function.

Heavy imports (torch, transformers) happen inside the commands so that `--help` stays fast.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer

from adapt.core.boundary import explain
from adapt.core.errors import AdaptError, first_line
from adapt.publishing.gguf_command import gguf_cmd
from adapt.serving.command import serve_cmd

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="adapt",
    help="Turn pretrained autoregressive causal LMs into masked diffusion language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


DEBUG_ENV = "ADAPT_DEBUG"
_debug = {"on": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option(help="Show the full traceback of every error.")] = False,
) -> None:
    """Turn pretrained autoregressive causal LMs into masked diffusion language models."""
    _debug["on"] = debug


def debugging() -> bool:
    """`adapt --debug ...`, or ADAPT_DEBUG=1 (also for the convert.py/finetune.py/sample.py scripts)."""
    return _debug["on"] or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def reports_errors(fn: F) -> F:
    """The error boundary: expected failures become `error: ...` on stderr and exit code 1 (130 on Ctrl-C).

    `adapt.core.boundary.explain` decides what is expected (our `AdaptError`, file system, corrupt weights,
    blocked pickles, bad bytes, the Hub); anything else is a bug and keeps its traceback, as does
    everything under --debug.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, click.ClickException):
            raise
        except Exception as e:
            message = explain(e)
            if message is None or debugging():
                raise
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def script(command: Callable[..., Any]) -> typer.Typer:
    """A one-command app for the convert.py/finetune.py/sample.py scripts, with the same boundary."""
    one = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    one.command()(command)
    return one


def quiet_libraries() -> None:
    """Keep library progress bars and advisory warnings out of our command output."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@app.command("convert")
@reports_errors
def convert_cmd(
    model: Annotated[str, typer.Argument(help="Source causal LM: a local directory or a Hub id.")],
    out: Annotated[Path, typer.Argument(help="Output directory for the diffusion checkpoint.")],
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    attn_implementation: Annotated[str, typer.Option(help="sdpa or eager.")] = "sdpa",
    mask_init: Annotated[str, typer.Option(help="Mask embedding init: mean, normal or zero.")] = "mean",
    shift: Annotated[bool, typer.Option(help="Logits at i predict token i+1 (recorded).")] = True,
    revision: Annotated[str | None, typer.Option(help="Hub revision of the source.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite a non-empty OUT.")] = False,
) -> None:
    """Convert a causal LM into a masked-diffusion checkpoint loadable by stock transformers."""
    from adapt.conversion.convert import ConvertOptions, convert

    if mask_init not in ("mean", "normal", "zero"):
        raise AdaptError(f"--mask-init must be mean, normal or zero, not {mask_init!r}")
    options = ConvertOptions(
        dtype=dtype,
        attn_implementation=attn_implementation,
        mask_init=mask_init,  # type: ignore[arg-type]
        shift=shift,
        revision=revision,
        force=force,
    )
    result = convert(model, out, options)
    s = result.settings
    if result.already_converted:
        typer.echo(
            f"{model} is already a diffusion checkpoint (mask token id {s.mask_token_id}); nothing to do"
        )
        return
    row = "reused a spare embedding row" if result.reused_row else "added a new embedding row"
    typer.echo(f"mask token {s.mask_token!r} = id {s.mask_token_id} ({row}); shift={s.shift}")
    typer.echo(f"checks passed: {', '.join(result.checks)}")
    typer.echo(f"wrote {result.out}")


@app.command("verify")
@reports_errors
def verify_cmd(
    checkpoint: Annotated[
        str, typer.Argument(help="Diffusion checkpoint: a local directory or a Hub id (NAMESPACE/NAME).")
    ],
    revision: Annotated[
        str | None, typer.Option(help="Hub revision (branch, tag or commit) when CHECKPOINT is a Hub id.")
    ] = None,
) -> None:
    """Check a diffusion checkpoint loaded with stock transformers (CPU): settings, bidirectional
    attention, padding and batch invariance; block causality and the exact KV cache for block checkpoints.

    Example: adapt verify out/smollm2-diffusion
    """
    from adapt.conversion.verify import checkpoint_checks, describe, load_checkpoint

    model, tokenizer, settings = load_checkpoint(checkpoint, revision)
    for name in checkpoint_checks(model, tokenizer, settings):
        typer.echo(f"ok  {name}")
    typer.echo(f"verified {checkpoint} ({describe(settings)})")


@app.command("push")
@reports_errors
def push_cmd(
    checkpoint: Annotated[
        str,
        typer.Argument(help="Diffusion checkpoint or LoRA adapter export: a directory or a cached Hub id."),
    ],
    repo_id: Annotated[str, typer.Argument(help="Hub repository, NAMESPACE/NAME.")],
    private: Annotated[bool, typer.Option(help="Create the repository as private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to push to (created if missing).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the card and the files; upload nothing.")] = False,
    commit_message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
    license: Annotated[str | None, typer.Option(help="License id for the card (default: source's).")] = None,
    allow_non_finite: Annotated[
        bool,
        typer.Option(help="Publish even if the recorded metrics hold NaN or infinity (never NaN weights)."),
    ] = False,
    base_model: Annotated[
        str | None,
        typer.Option(
            help="LoRA adapters: the Hub id of the base diffusion checkpoint (default: the recorded one)."
        ),
    ] = None,
    stage: Annotated[
        Path | None,
        typer.Option(help="Write exactly what would be uploaded into this new directory; upload nothing."),
    ] = None,
) -> None:
    """Upload a diffusion checkpoint or a LoRA adapter export with a generated model card (token: HF_TOKEN or
    `hf auth login`)."""
    from adapt.publishing.hub import plan_push, upload

    if stage is not None and stage.exists() and (not stage.is_dir() or any(stage.iterdir())):
        raise AdaptError(f"--stage {stage} exists and is not an empty directory; choose a new one")
    plan = plan_push(checkpoint, repo_id, license, allow_non_finite, base_model)
    if dry_run or stage is not None:
        if dry_run:
            typer.echo(plan.card)
        typer.echo(f"would upload {len(plan.repo_files)} files to {repo_id}:")
        for name, content in plan.contents():
            generated = isinstance(content, bytes)
            size = len(content) if isinstance(content, bytes) else content.stat().st_size
            typer.echo(f"  {name} ({size} bytes{', generated' if generated else ''})")
        if stage is not None:
            typer.echo(f"staged in {plan.stage(stage)}")
        return
    upload(plan, repo_id, private=private, revision=revision, commit_message=commit_message)
    typer.echo(f"pushed {len(plan.repo_files)} files to {repo_id}" + (f" ({revision})" if revision else ""))


@app.command("finetune")
@reports_errors
def finetune_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Recipe overrides, section.key=value (YAML-typed).")
    ] = None,
    print_config: Annotated[bool, typer.Option(help="Print the resolved recipe and exit.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            help="Start over in a training.output_dir that holds an earlier run: its checkpoints, metrics "
            "and export move to OUTPUT_DIR/previous-TIME/ (never deleted, never mixed)."
        ),
    ] = False,
) -> None:
    """Fine-tune on the masked-diffusion objective (full or LoRA); export a ready-to-sample checkpoint."""
    from adapt.training.config import load_recipe, recipe_to_dict

    resolved = load_recipe(recipe, overrides or [])
    if print_config:
        import yaml

        typer.echo(yaml.safe_dump(recipe_to_dict(resolved), sort_keys=False))
        return
    import logging

    import datasets

    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # libraries: warnings only
    logging.getLogger("adapt").setLevel(logging.INFO)
    datasets.disable_progress_bars()
    from adapt.training.run import close_process_group, leave_launch, run

    try:
        state, exported = run(resolved, force=force)
    finally:
        close_process_group()
    if state.interrupted:
        by = state.stopped_by or "SIGINT"
        typer.echo(
            f"interrupted at step {state.step} ({by}); saved {state.checkpoint}; rerun to resume", err=True
        )
        leave_launch(128 + signal.Signals[by].value)
        raise typer.Exit(128 + signal.Signals[by].value)  # the shell's convention: 130, 143
    evaluated = f", eval loss {state.eval_loss:.4f}" if state.eval_loss is not None else ""
    loss = f"{state.train_loss:.4f}" if state.train_loss is not None else "n/a"
    typer.echo(f"trained {state.step} steps on {state.tokens_seen} tokens, loss {loss}{evaluated}")
    if exported is not None:
        typer.echo(f"exported {exported}")
    leave_launch(0)


@app.command("eval")
@reports_errors
def eval_cmd(
    models: Annotated[
        list[str], typer.Argument(help="Diffusion checkpoints and/or AR models to compare (paths, Hub ids).")
    ],
    data: Annotated[str, typer.Option(help="Evaluation text: a local txt/jsonl/json/parquet/csv file.")],
    revision: Annotated[
        str | None, typer.Option(help="Hub revision (branch, tag or commit) of the Hub ids among MODELS.")
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Window length in tokens.")] = 128,
    max_sequences: Annotated[int, typer.Option(help="Evaluate at most this many windows.")] = 64,
    mc_samples: Annotated[int, typer.Option(help="Monte Carlo samples of t per window (ELBO).")] = 8,
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass.")] = 16,
    text_column: Annotated[str, typer.Option(help="Text column of json/parquet/csv data.")] = "text",
    seed: Annotated[int, typer.Option(help="Seed of t and masks.")] = 0,
    dtype: Annotated[
        str, typer.Option(help="float32 (default: bounds to compare), bfloat16, float16, auto or checkpoint.")
    ] = "float32",
    device: Annotated[str | None, typer.Option(help="Device (default cuda if available).")] = None,
    attn_implementation: Annotated[
        str, typer.Option(help="sdpa, eager or flex_attention (no dense mask: long windows).")
    ] = "sdpa",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    save: Annotated[
        bool, typer.Option(help="Write eval_results.json into the first diffusion checkpoint.")
    ] = False,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG plot here (needs matplotlib).")] = None,
    gen_steps: Annotated[
        str, typer.Option(help="Comma-separated step counts for generative perplexity (empty: skip).")
    ] = "",
    gen_samples: Annotated[int, typer.Option(help="Samples per step count.")] = 8,
    gen_length: Annotated[int, typer.Option(help="Tokens per sample.")] = 32,
    judge: Annotated[
        str | None, typer.Option(help="AR judge for generative perplexity (default: source).")
    ] = None,
) -> None:
    """ELBO perplexity bound and masked accuracy of diffusion checkpoints beside AR models' perplexity."""

    from adapt.core.boundary import check_output_file, resolve_device
    from adapt.core.outputs import check_apart, json_text
    from adapt.evaluation import evaluate as ev

    device = resolve_device(device)
    for option, target in (("--json", json_out), ("--plot", plot)):
        if target is not None:
            check_output_file(target, option)
            for what, source in [("--data", data), *(("the model", m) for m in models)]:
                check_apart(target, source, f"{option} {target}", what)
    config = ev.EvalConfig(
        data=data,
        text_column=text_column,
        seq_len=seq_len,
        max_sequences=max_sequences,
        mc_samples=mc_samples,
        batch_size=batch_size,
        seed=seed,
        dtype=dtype,
        device=device,
        revision=revision,
        attn_implementation=attn_implementation,
    )
    gcfg = None
    if gen_steps.strip():
        try:
            steps = tuple(int(s) for s in gen_steps.split(",") if s.strip())
        except ValueError:
            raise AdaptError(f"--gen-steps takes step counts such as 8,16,32, not {gen_steps!r}") from None
        gcfg = ev.GenPplConfig(
            steps=steps, num_samples=gen_samples, gen_length=gen_length, judge=judge, seed=seed
        )
    results = ev.evaluate(models, config, gcfg)  # every size checked before the first model loads
    diffusion = [r["model"] for r in results["models"] if r["kind"] == "diffusion"]
    typer.echo(ev.format_table(results))
    if json_out:
        json_out.write_text(json_text(results))
        typer.echo(f"wrote {json_out}")
    if save:
        if not diffusion:
            raise AdaptError("--save needs a diffusion checkpoint among MODELS")
        typer.echo(f"wrote {ev.save_results(diffusion[0], results)}")
    if plot:
        typer.echo(f"wrote {ev.plot_results(results, plot)}")


@app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
@reports_errors
def lm_eval_cmd(ctx: typer.Context) -> None:
    """lm-evaluation-harness with the `adapt` model: lm-eval's own arguments, `--model adapt` by default.

    Example: adapt lm-eval --model_args pretrained=CKPT,mc_samples=32 --tasks hellaswag --batch_size 8
    (`adapt lm-eval --help` shows lm-eval's options; `accelerate launch -m adapt.lm_eval_model ...` shards
    the requests across processes.)
    """
    try:
        from adapt.evaluation.lm_eval_model import run_cli
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        raise AdaptError(f"lm-eval is not installed ({first_line(e)}): pip install 'adapt[eval]'") from None
    run_cli(list(ctx.args))


@app.command("sample")
@reports_errors
def sample_cmd(
    checkpoint: Annotated[
        str, typer.Argument(help="Diffusion checkpoint: a local directory or a Hub id (NAMESPACE/NAME).")
    ],
    revision: Annotated[
        str | None, typer.Option(help="Hub revision (branch, tag or commit) when CHECKPOINT is a Hub id.")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="Prompt text; repeat for a batch.")] = None,
    infill: Annotated[
        list[str] | None, typer.Option(help="Template with masks to fill: 'a <|mask|>*20 b'; repeatable.")
    ] = None,
    chat: Annotated[bool, typer.Option(help="Wrap prompts in the tokenizer's chat template.")] = False,
    gen_length: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 128,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (scheduled strategies).")] = None,
    block_length: Annotated[int | None, typer.Option(help="Semi-autoregressive block size.")] = None,
    strategy: Annotated[
        str,
        typer.Option(
            help="low_confidence, random, margin, entropy, threshold, entropy_bounded; for a block "
            "checkpoint with causal clean attention also ar (its AR stream) or verify (diffusion "
            "drafts checked by it)."
        ),
    ] = "low_confidence",
    draft_length: Annotated[int | None, typer.Option(help="verify: drafts per pass (default 1).")] = None,
    mask_block: Annotated[int | None, typer.Option(help="verify: masks per block (drafts + 1).")] = None,
    candidates: Annotated[int, typer.Option(help="verify: alternatives drafted for the next token.")] = 1,
    redraft: Annotated[
        bool, typer.Option("--redraft/--no-redraft", help="verify: a mask block per draft outcome (TiDAR).")
    ] = True,
    step_schedule: Annotated[
        str, typer.Option(help="Tokens per step: uniform (LLaDA) or dream (Dream's s/t ratio).")
    ] = "uniform",
    threshold: Annotated[float, typer.Option(help="Confidence threshold of `threshold` decoding.")] = 0.9,
    entropy_bound: Annotated[float, typer.Option(help="Entropy budget of `entropy_bounded`.")] = 1.0,
    temperature: Annotated[float, typer.Option(help="0: greedy; > 0: Gumbel sampling.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Top-k filtering (0: off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus filtering (1: off).")] = 1.0,
    confidence: Annotated[
        str,
        typer.Option(
            help="Ranking at temperature > 0: untempered (LLaDA, Fast-dLLM), tempered (Dream) or auto "
            "(tempered for margin and entropy)."
        ),
    ] = "auto",
    cache: Annotated[
        str,
        typer.Option(help="KV cache: auto, none, prefix or dual (auto: exact prefix for block checkpoints)."),
    ] = "auto",
    cache_refresh: Annotated[int, typer.Option(help="Recompute the cache every N steps (0: per block).")] = 0,
    stop_at_eos: Annotated[bool, typer.Option(help="Cut at EOS; stop once every output has one.")] = True,
    eos_penalty: Annotated[float, typer.Option(help="Subtract from the EOS logit (EOS flooding).")] = 0.0,
    eos_confidence_cap: Annotated[
        float | None, typer.Option(help="Cap the confidence of EOS predictions.")
    ] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string; repeatable.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of sampling noise.")] = 0,
    dtype: Annotated[
        str,
        typer.Option(
            help="auto (bfloat16 where the device multiplies it natively, else float32), float32, bfloat16, "
            "float16 or checkpoint (its saved dtype)."
        ),
    ] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda if available).")] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON record: texts, tokens, NFE, steps, tokens/s.")
    ] = False,
    stream: Annotated[bool, typer.Option(help="Show the canvas filling in.")] = True,
) -> None:
    """Generate text (or fill masks) with a diffusion checkpoint."""
    from adapt.sampling.command import sample
    from adapt.sampling.config import SamplingConfig

    config = SamplingConfig(
        gen_length=gen_length,
        steps=steps,
        block_length=block_length,
        strategy=strategy,  # type: ignore[arg-type]
        step_schedule=step_schedule,  # type: ignore[arg-type]
        threshold=threshold,
        draft_length=draft_length,
        mask_block=mask_block,
        candidates=candidates,
        redraft=redraft,
        entropy_bound=entropy_bound,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        confidence=confidence,  # type: ignore[arg-type]
        cache=cache,  # type: ignore[arg-type]
        cache_refresh=cache_refresh,
        stop_at_eos=stop_at_eos,
        eos_penalty=eos_penalty,
        eos_confidence_cap=eos_confidence_cap,
        stop=tuple(stop or ()),
        chat=chat,
        seed=seed,
    )
    sample(checkpoint, prompt or [], infill or [], config, dtype, device, json_output, stream, revision)


app.command("serve")(reports_errors(serve_cmd))  # its options live beside the server: adapt/serving
app.command("gguf")(reports_errors(gguf_cmd))  # options in adapt/publishing/gguf_command.py


@app.command("quickstart")
@reports_errors
def quickstart_cmd(
    tiny: Annotated[bool, typer.Option(help="A tiny random llama on the embedded text (seconds).")] = False,
    steps: Annotated[int | None, typer.Option(help="Override the recipe's training steps.")] = None,
    out: Annotated[Path, typer.Option(help="Working directory of the job.")] = Path("out/quickstart"),
) -> None:
    """Convert a real pretrained model, diffusion-fine-tune it, evaluate and sample (offline, CPU)."""
    from adapt.quickstart import report, run_quickstart

    typer.echo(report(run_quickstart(out, tiny=tiny, steps=steps)))


def main() -> None:
    """Entry point of the `adapt` console script."""
    app()


if __name__ == "__main__":
    sys.exit(main())

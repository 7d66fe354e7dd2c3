"""What `adapt eval` writes: eval_results.json inside a checkpoint (atomically, recorded as adapt's), a
PNG plot, and the side-by-side table."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from adapt.core.errors import AdaptError
from adapt.core.outputs import current_umask, json_text
from adapt.core.ownership import add_owned

RESULTS_NAME = "eval_results.json"


def save_results(checkpoint: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Write eval_results.json into the checkpoint directory atomically (temp file + rename)."""
    target = Path(checkpoint) / RESULTS_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{RESULTS_NAME}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json_text(results))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
        add_owned(target.parent, RESULTS_NAME)  # replacing the checkpoint later may remove it
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def plot_results(results: dict[str, Any], out: str | os.PathLike) -> Path:
    """PNG: masked-token accuracy vs mask ratio per diffusion model; generative perplexity vs NFE."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AdaptError("plots need matplotlib: pip install 'adapt[eval]'") from None
    gen = results.get("gen_ppl") or []
    fig, axes = plt.subplots(1, 2 if gen else 1, figsize=(10 if gen else 5, 4), squeeze=False)
    ax = axes[0][0]
    for row in results["models"]:
        acc = row.get("masked_accuracy")
        if acc:
            xs = sorted(acc, key=float)
            ax.plot([float(x) for x in xs], [acc[x] for x in xs], marker="o", label=Path(row["model"]).name)
    ax.set(xlabel="mask ratio", ylabel="masked-token accuracy", title="Masked-token accuracy")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    if gen:
        ax2 = axes[0][1]
        ax2.plot([g["nfe"] for g in gen], [g["gen_ppl"] for g in gen], marker="o")
        ax2.set(
            xlabel="NFE (forward passes)", ylabel="generative perplexity", title="Samples judged by AR model"
        )
        ax2.set_xscale("log", base=2)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def format_table(results: dict[str, Any]) -> str:
    """Plain-text table of the results for the terminal."""
    head = f"{'model':<28} {'kind':<10} {'ppl':>10} {'nll':>8} {'±se':>7} {'tokens':>7}  masked acc"
    lines = [head]
    for r in results["models"]:
        acc = " ".join(f"{k}:{v:.3f}" for k, v in (r.get("masked_accuracy") or {}).items())
        ppl = ("<=" if r["kind"] == "diffusion" else "") + f"{r['ppl']:.2f}"
        name = Path(r["model"]).name[:28]
        kind = f"block {r['block_size']}" if r.get("block_size") else r["kind"]
        lines.append(f"{name:<28} {kind:<10} {ppl:>10} {r['nll']:>8.4f} {r['nll_stderr']:>7.4f} "
                     f"{r['tokens']:>7}  {acc}")  # fmt: skip
    for g in results.get("gen_ppl") or []:
        lines.append(
            f"gen ppl @ {g['steps']} steps (NFE {g['nfe']}): {g['gen_ppl']:.2f}, entropy {g['entropy']:.3f}"
        )
    return "\n".join(lines)

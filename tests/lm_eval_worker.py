"""lm-eval on the tiny local tasks without indexing lm-eval's own task files (the ~10 s its command line
spends on every start), for the two-process test: `accelerate launch ... tests/lm_eval_worker.py CKPT OUT`.

Rank 0 writes OUT: the results and, per task, the responses scored for each document.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TASKS = Path(__file__).parent / "lm_eval_tasks"
TASK_NAMES = ["adapt_tiny_mc", "adapt_tiny_rolling", "adapt_tiny_gen"]


def evaluate(model_args: str, batch_size: int) -> dict | None:
    """simple_evaluate on the tiny tasks; the results on rank 0, None on the other ranks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import adapt.evaluation.lm_eval_model  # noqa: F401  (registers model type "adapt")

    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    return lm_eval.simple_evaluate(
        model="adapt", model_args=model_args, tasks=TASK_NAMES, task_manager=manager,
        batch_size=batch_size, log_samples=True, bootstrap_iters=0, device="cpu",
    )  # fmt: skip


def responses(results: dict) -> dict[str, dict[int, list]]:
    """Per task, per document: the responses its metrics used."""
    return {
        task: {s["doc_id"]: s["filtered_resps"] for s in rows} for task, rows in results["samples"].items()
    }


if __name__ == "__main__":
    checkpoint, out = sys.argv[1], Path(sys.argv[2])
    found = evaluate(f"pretrained={checkpoint},mc_samples=3,seed=7,max_gen_toks=8", 2)
    if found is not None:
        record = {"results": found["results"], "config": found["config"], "responses": responses(found)}
        out.write_text(json.dumps(record, default=str))
    from adapt.evaluation.lm_eval_model import end_processes

    end_processes()  # as `adapt lm-eval` does after lm-eval's run

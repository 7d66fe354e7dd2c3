"""`python -m adapt.lm_eval_model` / `accelerate launch -m adapt.lm_eval_model`: `adapt lm-eval` as a module
entry point (lm-eval's own arguments, `--model adapt` by default).

Importing it registers the lm-eval model type `adapt`, as importing `adapt.evaluation.lm_eval_model` does.
"""

import sys

from adapt.evaluation.lm_eval_model import AdaptLM  # noqa: F401  (registers model type "adapt")

if __name__ == "__main__":
    from adapt.cli import app

    app(["lm-eval", *sys.argv[1:]], prog_name="python -m adapt.lm_eval_model")

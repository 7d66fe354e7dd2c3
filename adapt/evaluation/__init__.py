"""Stage 3, evaluation: ELBO perplexity bounds, masked accuracy and generative perplexity of diffusion
checkpoints beside AR models (`evaluate`), and the lm-evaluation-harness model (`lm_eval_model`)."""

"""The shared vocabulary every stage speaks: errors and the error boundary, the checkpoint format, where
a checkpoint lives, diffusion math, attention masks, atomic outputs. Nothing here imports a stage."""

"""Generate text with a diffusion checkpoint.

python sample.py out/llama-diffusion --prompt "The river ran" --gen-length 64 --block-length 16
python sample.py CKPT --prompt "Tell me a story" --chat --strategy threshold --threshold 0.9 --cache dual
python sample.py CKPT --infill "def f(x):<|mask|>*20 return y" --json
python sample.py CKPT --prompt "a" --prompt "a longer prompt" --temperature 0.8 --top-p 0.95 --seed 1
adapt sample CKPT --prompt "..."     # the same command
"""

from adapt.cli import sample_cmd, script

if __name__ == "__main__":
    script(sample_cmd)()

"""Convert a pretrained causal LM into a masked-diffusion checkpoint.

python convert.py gpt2 out/gpt2-diffusion
python convert.py ./my-llama out/llama-diffusion --dtype bfloat16 --force
adapt convert Qwen/Qwen2.5-0.5B out/qwen-diffusion
"""

from adapt.cli import convert_cmd, script

if __name__ == "__main__":
    script(convert_cmd)()

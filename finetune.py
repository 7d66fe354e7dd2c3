"""Fine-tune a causal LM (converted on the fly) or a diffusion checkpoint on the masked-diffusion objective.

python finetune.py recipes/adapt_text.yaml
python finetune.py recipes/adapt_text.yaml model.path=Qwen/Qwen2.5-0.5B training.max_steps=1000
python finetune.py recipes/sft_chat.yaml training.lr=5e-5 diffusion.train_on_padding=true
python finetune.py recipes/lora_chat.yaml lora.r=8 lora.export=adapter --print-config
ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 finetune.py recipes/multi_process.yaml
adapt finetune recipes/adapt_text.yaml training.output_dir=out/run2
"""

from adapt.cli import finetune_cmd, script

if __name__ == "__main__":
    script(finetune_cmd)()

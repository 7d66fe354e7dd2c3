#!/usr/bin/env bash
# The GPU checks of training at length (flex_attention), in one run on a lent GPU, about 8 minutes on an
# H200: what the CPU cannot do, since torch has no FlexAttention backward there.
#
#   1. tests/test_flex.py's CUDA tests: every objective's loss and gradients under flex_attention equal
#      sdpa's (never run before), and transformers' compiled flex path.
#   2. bench/long_context.py on CUDA, SmolLM2-135M's shapes with random weights, fp32 weights under bf16
#      autocast, gradient checkpointing: AR and block diffusion under sdpa (the tiled pair kernel) and
#      flex_attention at L = 4096 (batch 1 and 8), then L = 1024 and 2048 (batch 1), as time allows.
#      Step time, peak torch.cuda.max_memory_allocated, the first step (flex compiles there).
#
# Not here: ZeRO-3/FSDP2 host memory per rank on GPUs. It needs one GPU per rank (NCCL), and the machine
# lent here has one.
#
# Here, once (pip reaches the registries; nothing is fetched there):
#     bash bench/gpu_checks.sh prepare
#   writes .gpu/smollm2-135m (SmolLM2-135M-Instruct's config and tokenizer, no weights: they are 270 MB,
#   over the 64 MiB that travels) and .whl/ (transformers and accelerate as installed here, pure Python;
#   the device's image has older ones), both ignored by git (.git/info/exclude).
# There, through the device tool:
#     run(command="bash bench/gpu_checks.sh", carry=[".gpu", ".whl"], timeout_s=560)
#   Results come back under $OUT: versions.txt, flex_tests.txt, long_context_4096.{txt,json},
#   long_context_short.{txt,json}.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
    set -e
    for d in /.gpu/ /.whl/; do grep -qxF "$d" .git/info/exclude || echo "$d" >>.git/info/exclude; done
    src=${SMOLLM2:-$HOME/.cache/adapt/smollm2-135m-instruct}
    mkdir -p .gpu/smollm2-135m
    cp "$src"/{config.json,tokenizer.json,tokenizer_config.json} .gpu/smollm2-135m/
    rm -rf .whl && mkdir .whl
    versions=$(python3 -c "import transformers, accelerate; print(transformers.__version__, accelerate.__version__)")
    read -r tv av <<<"$versions"
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "transformers==$tv" "accelerate==$av"
    ls -la .gpu/smollm2-135m .whl
    exit 0
fi

OUT=${OUT:-out/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -f .gpu/smollm2-135m/config.json ] || { echo "error: run 'bash bench/gpu_checks.sh prepare' here first"; exit 1; }

python3 - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import accelerate, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print("torch", torch.__version__, "cuda", torch.version.cuda, gpu)
print("transformers", transformers.__version__, "accelerate", accelerate.__version__)
EOF

echo "== 1. flex_attention against sdpa on CUDA (loss and gradients)"
timeout 150 python3 -m pytest tests/test_flex.py -k "cuda or compiled" -q -p no:cacheprovider -m "slow or not slow" \
    2>&1 | tee "$OUT/flex_tests.txt"

bench() {  # NAME SECONDS ARGS...: one bench run, its rows printed as they finish
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout "$seconds" python3 bench/long_context.py --model .gpu/smollm2-135m --random-weights --autocast bf16 \
        --objectives ar,block --attn sdpa,flex_attention --checkpointing on --steps 3 --timeout 120 \
        --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.txt"
}
echo "== 2. training at length on CUDA"
bench long_context_4096 240 --lengths 4096 --batches 1,8
bench long_context_short 120 --lengths 1024,2048 --batches 1

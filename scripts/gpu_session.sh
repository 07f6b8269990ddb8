#!/usr/bin/env bash
# The GPU proof on the lent machine (prepare .whl with scripts/fetch_gpu_wheels.sh and carry it).
#   scripts/gpu_session.sh check   gpu_check.py (CUDA correctness incl. flex-attention gradients, Qwen-VL-Chat-size
#                                  step + generation, benchmark at batch 8/16, profile) + flex-attention benchmark (~4 min)
#   scripts/gpu_session.sh zero    ~30-step train_dpo.py runs at Qwen-VL-Chat size (random bf16 checkpoint written
#                                  first) with DeepSpeed ZeRO-2, then ZeRO-3, then 10 steps without DeepSpeed (~6 min)
#   scripts/gpu_session.sh trl     TRL 1.16 DPOTrainer vs ours on a Qwen2-VL-7B-shaped model (random bf16 weights,
#                                  LoRA r64, checkpointing, 448x448 images), batch 8 and 32, one run (~5 min)
#   scripts/gpu_session.sh trl3    the same on a Qwen3-VL-8B-shaped model (DeepStack tower, 448x448 images: 196 tokens)
#   scripts/gpu_session.sh trlmoe  the same on a Qwen3-VL-30B-A3B-shaped model (128 experts, 8 per token; both with the
#                                  routers' balancing loss; 62 GB of bf16 weights: run it on nvidia-h200)
#   scripts/gpu_session.sh trlivl  the same on an InternVL3-8B-shaped model (InternViT-300M, 448x448 images: one tile,
#                                  256 tokens)
#   scripts/gpu_session.sh trlgemma the same on a gemma-3-4b-it-shaped model (SigLIP at 896 px pooled to 256 tokens;
#                                  5 sliding-window layers to 1 full, an image attended both ways)
#   scripts/gpu_session.sh perf    the speed levers (issue 21), one run (<= 9.5 min; each benchmark rewrites its JSON
#                                  after every run, so a stage its time limit cuts keeps what it measured):
#                                  lever_check.py (each lever's log-prob and logit difference vs the fp32 reference at
#                                  Qwen-VL-Chat size); benchmark.py at that size, batch 8, the levers beside the
#                                  cached-reference path (MFU); TRL vs ours + levers at the Qwen2-VL-7B shape: TRL's
#                                  defaults at batch 32 and TRL without checkpointing at batch 8 (its best candidates),
#                                  ours with and without the cached reference (a run that fails is one FAILED line and
#                                  the others go on; liger runs go last); every run, TRL's too, loads its batches
#                                  in 4 DataLoader workers as the paper recipe does (collation off the step);
#                                  each compiling run starts from an empty dynamo cache and prints its graph count
#                                  ("RECOMPILE LIMIT HIT" if its blocks fell back to eager); the TRL stage ends with
#                                  TRL's best run against ours within its memory, with and without the cached reference
# Output lands in $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
stage() { echo "=== $1 ($(date +%T))"; }
# progress bars end in \r, so split them into lines first (else a logged loss shares a line with a bar and is lost)
quiet() { tr '\r' '\n' | grep -v "Warning\|warnings.warn\|_warn_once\|it/s]\|s/it]\|examples/s]\|^ *$"; }

if [ "${1:-check}" = check ]; then
    stage gpu_check
    timeout 300 python3 scripts/gpu_check.py --device cuda --dtype bf16 --batch-sizes 8 16 --steps 3 --out "$OUT" 2>&1 \
        | quiet | tee "$OUT/gpu_check.log"
    stage flex_benchmark
    timeout 150 python3 scripts/benchmark.py --device cuda --dtype bf16 --batch-sizes 8 --steps 3 --warmup 1 \
        --paths plain optimized optimized+cached_ref --attn flex_attention --out "$OUT/bench_flex.json" 2>&1 \
        | quiet | tee "$OUT/bench_flex.log"
elif [ "$1" = perf ]; then
    stage lever_check
    timeout 85 python3 scripts/lever_check.py --device cuda --dtype bf16 --out "$OUT" \
        --levers liger varlen native_norm flex pack4 compile 2>&1 | quiet | tee "$OUT/lever_check.log"
    stage levers_qwen_vl
    timeout 200 python3 scripts/benchmark.py --device cuda --dtype bf16 --batch-sizes 8 --steps 3 --warmup 2 \
        --dataloader-workers 4 --count-flops --paths optimized+cached_ref \
        --levers no_ckpt varlen+native_norm flex+native_norm varlen+native_norm+compile+no_ckpt \
        varlen+native_norm+compile+no_ckpt+pack8 liger+varlen+native_norm+compile+no_ckpt \
        --out "$OUT/bench_levers.json" 2>&1 | quiet | tee "$OUT/bench_levers.log"
    stage levers_trl
    timeout 270 python3 scripts/benchmark.py --family qwen2_vl --device cuda --dtype bf16 --batch-sizes 8 32 \
        --steps 3 --warmup 2 --dataloader-workers 4 --runs trl+no_ckpt@8 trl@32 silkie-optimized@32 \
        --levers cached_ref+varlen+no_ckpt@8 varlen+no_ckpt@8 cached_ref+varlen@32 cached_ref+varlen+compile@32 \
        cached_ref+liger+varlen+compile@32 \
        --out "$OUT/bench_levers_trl.json" 2>&1 | quiet | grep -v "^{'train_runtime" | tee "$OUT/bench_levers_trl.log"
elif [ "$1" = trl ] || [ "$1" = trl3 ] || [ "$1" = trlmoe ] || [ "$1" = trlivl ] || [ "$1" = trlgemma ]; then
    case "$1" in
        trl3) family=qwen3_vl ;; trlmoe) family=qwen3_vl_moe ;; trlivl) family=internvl ;; trlgemma) family=gemma3 ;;
        *) family=qwen2_vl ;;
    esac
    stage "trl_vs_silkie $family"
    timeout 420 python3 scripts/benchmark.py --family "$family" --device cuda --dtype bf16 --batch-sizes 8 32 \
        --steps 3 --warmup 1 --runs trl silkie-optimized silkie-optimized+cached_ref --out "$OUT/bench_$1.json" 2>&1 \
        | quiet | grep -v "^{'train_runtime" | tee "$OUT/bench_$1.log"
else
    stage checkpoint
    python3 scripts/make_tiny_qwen_vl.py /tmp/qwen-vl-size --official-size --device cuda 2>&1 | tail -1
    python3 scripts/make_synthetic_vlfeedback.py /tmp/data --n 200 --image-size 448 > /dev/null
    for zero in 2 3; do
        stage "zero$zero"
        timeout 200 python3 -m torch.distributed.run --standalone --nproc_per_node 1 train_dpo.py \
            --config dpo_config/silkie.yaml --working "/tmp/zero$zero" model.path=/tmp/qwen-vl-size \
            data.path=/tmp/data/vlfeedback_80k.jsonl data.images=/tmp/data/merged_images.zip data.eval_size=10 \
            data.num_proc=4 deepspeed.stage=$zero training.max_steps=30 training.eval_steps=30 training.save_steps=30 \
            training.per_device_train_batch_size=4 training.global_batch_size=4 \
            training.dataloader_num_workers=2 launch.nproc_per_node=1 2>&1 | quiet | grep "silkie\]\|Error\|'loss'" \
            | tee "$OUT/zero$zero.log"
        cp "/tmp/zero$zero/metrics.jsonl" "$OUT/zero$zero-metrics.jsonl" 2>/dev/null
    done
    stage "no_deepspeed"  # bf16 under accelerate's autocast (the path that needs the chunked head's dtype cast)
    timeout 120 python3 -m torch.distributed.run --standalone --nproc_per_node 1 train_dpo.py \
        --config dpo_config/silkie.yaml --working /tmp/zero0 model.path=/tmp/qwen-vl-size \
        data.path=/tmp/data/vlfeedback_80k.jsonl data.images=/tmp/data/merged_images.zip data.eval_size=10 \
        data.num_proc=4 deepspeed.stage=0 training.max_steps=10 training.eval_steps=10 training.save_steps=10 \
        training.per_device_train_batch_size=4 training.global_batch_size=4 training.logging_steps=1 \
        launch.nproc_per_node=1 2>&1 | quiet | grep "silkie\]\|Error\|'loss'" | tee "$OUT/zero0.log"
    cp /tmp/zero0/metrics.jsonl "$OUT/zero0-metrics.jsonl" 2>/dev/null
fi

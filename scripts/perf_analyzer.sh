#!/usr/bin/env bash
# perf_analyzer against a triton-vlm server that already runs, as its users run it: gRPC, --streaming,
# requests with real photos (scikit-image's samples) in several sizes, a concurrency sweep. Starts nothing.
#
#   scripts/perf_analyzer.sh [GRPC_URL]        (default 127.0.0.1:8001)
#   env: CONCURRENCY="1 4 16 32"  PROMPT='USER: <image>\nDescribe the image.\nASSISTANT:' (the checkpoint's format)
#        SAMPLING='{"max_tokens": 32, "temperature": 0}'  INTERVAL_MS=8000  OUT=work/perf_analyzer
#        STABILITY=100 (perf_analyzer's --stability-percentage: a shared host rarely holds 3 windows within 10%)
set -euo pipefail
cd "$(dirname "$0")/.."

URL=${1:-127.0.0.1:8001}
CONCURRENCY=${CONCURRENCY:-"1 4 16 32"}
PROMPT=${PROMPT:-'USER: <image>\nDescribe the image.\nASSISTANT:'}
SAMPLING=${SAMPLING:-'{"max_tokens": 32, "temperature": 0}'}
INTERVAL_MS=${INTERVAL_MS:-8000}
OUT=${OUT:-work/perf_analyzer}
mkdir -p "$OUT"

# One request per photo and size; vlm takes an image element as the file's base64 text.
PROMPT="$PROMPT" SAMPLING="$SAMPLING" .venv/bin/python - "$OUT/input.json" <<'EOF'
import base64, io, json, os, sys

import skimage.data
from PIL import Image

prompt = os.environ["PROMPT"].replace("\\n", "\n")
data = []
for name in ("astronaut", "chelsea", "coffee", "rocket"):
    photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    for side in (64, 336, None):  # small, the usual LLaVA input, the photo as shipped (300-640 px)
        img = photo if side is None else photo.resize((side, side * photo.height // photo.width))
        buf = io.BytesIO()
        img.save(buf, "JPEG" if side is None else "PNG")
        data.append({"text_input": [prompt], "stream": [True], "sampling_parameters": [os.environ["SAMPLING"]],
                     "image": {"content": [base64.b64encode(buf.getvalue()).decode()], "shape": [1]}})
json.dump({"data": data}, open(sys.argv[1], "w"))
print(f"{len(data)} requests: 4 photos x 3 sizes -> {sys.argv[1]}")
EOF

# perf_analyzer links libcudart even for CPU-only use: the copy from the nvidia-cuda-runtime wheel serves.
CUDART=$(.venv/bin/python -c 'import nvidia.cuda_runtime as m; print(list(m.__path__)[0])')/lib
for c in $CONCURRENCY; do
  echo "== concurrency $c"
  LD_LIBRARY_PATH="$CUDART${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" .venv/bin/perf_analyzer -m vlm -i grpc --streaming \
    -u "$URL" --input-data "$OUT/input.json" --shape image:1 --concurrency-range "$c" \
    --measurement-interval "$INTERVAL_MS" --stability-percentage "${STABILITY:-100}" --max-trials 8 -f "$OUT/c$c.csv" \
    > "$OUT/c$c.log" 2>&1 || { cat "$OUT/c$c.log"; exit 1; }
  sed -n '/^  Client:/,/^  Server:/p' "$OUT/c$c.log" | grep -v "Server:"
done

echo "== summary (perf_analyzer's CSVs in $OUT)"
printf "%11s %12s %14s %14s %14s\n" concurrency "infer/sec" "p50 latency" "p90 latency" "p99 latency"
for c in $CONCURRENCY; do
  # Columns by name: perf_analyzer's CSV header names them (latencies in microseconds).
  awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
           { printf "%11s %12.2f %12.0fms %12.0fms %12.0fms\n", $col["Concurrency"], $col["Inferences/Second"],
             $col["p50 latency"] / 1000, $col["p90 latency"] / 1000, $col["p99 latency"] / 1000 }' "$OUT/c$c.csv"
done

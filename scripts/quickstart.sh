#!/usr/bin/env bash
# Set up, build a model repository for the default model, serve it on tritonserver,
# ask one question about an image with a streamed answer, and stop cleanly.
#   MODEL=/path/to/llava-checkpoint ./scripts/quickstart.sh   serves your own checkpoint instead
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
WORK=work/quickstart
mkdir -p "$WORK"

MODEL=${MODEL:-models/toy-vlm}
if [ ! -f "$MODEL/config.json" ]; then
  echo "== $MODEL not found: making a random tiny checkpoint instead"
  MODEL=$WORK/tiny
  .venv/bin/triton-vlm make-tiny "$MODEL" >"$WORK/make-tiny.log" 2>&1 || { cat "$WORK/make-tiny.log"; exit 1; }
fi

echo "== building the model repository for $MODEL"
.venv/bin/triton-vlm build --model "$MODEL" --output "$WORK/repo" >"$WORK/build.log" 2>&1 \
  || { cat "$WORK/build.log"; exit 1; }

# A fresh scene the toy model has never seen; any other checkpoint gets a real photo.
read -r IMAGE QUESTION < <($PY - "$WORK" "$MODEL" <<'PY'
import sys
from pathlib import Path
work, model = Path(sys.argv[1]), sys.argv[2]
if "toy-vlm" in model:
    import random
    from triton_vlm.geometry import ModelGeometry
    from triton_vlm.toy.scenes import sample_pair
    size = ModelGeometry.from_checkpoint(model).vision.image_size
    rng = random.Random()
    image, question, answer, _ = sample_pair(rng, size, rng.choice(["colour", "shape", "count", "spatial"]))
    image.save(work / "scene.png")
    (work / "expected.txt").write_text(answer)
    print(work / "scene.png", question)
else:
    import skimage.data
    from PIL import Image
    Image.fromarray(skimage.data.chelsea()).save(work / "scene.png")
    print(work / "scene.png", "What is in this picture?")
PY
)

HTTP=${HTTP_PORT:-8000}; GRPC=${GRPC_PORT:-8001}; METRICS=${METRICS_PORT:-8002}
echo "== starting tritonserver (log: $WORK/server.log)"
.venv/bin/triton-vlm serve --model-repository "$WORK/repo" --http-port "$HTTP" --grpc-port "$GRPC" \
  --metrics-port "$METRICS" --log-file "$WORK/server.log" > "$WORK/serve.out" 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null; wait $SERVE 2>/dev/null' EXIT
until grep -q "triton-vlm: ready" "$WORK/serve.out"; do
  if ! kill -0 $SERVE 2>/dev/null; then cat "$WORK/serve.out"; exit 1; fi
  sleep 1
done
cat "$WORK/serve.out"

echo "== image: $IMAGE"
echo "USER: $QUESTION"
printf "ASSISTANT:"
$PY clients/ask.py --url "127.0.0.1:$GRPC" "$QUESTION" "$IMAGE" --max-tokens 32
[ -f "$WORK/expected.txt" ] && echo "(the scene was drawn with answer: $(cat "$WORK/expected.txt"))"

echo "== stopping"
kill -TERM $SERVE
wait $SERVE
trap - EXIT
echo "== done"

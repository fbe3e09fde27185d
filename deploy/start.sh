#!/bin/sh
# The images' entrypoint: build the model repository for $MODEL_DIR at start-up, then run
# `triton-vlm serve` on every interface (it binds loopback unless told otherwise).
#   MODEL_DIR    a Hugging Face LLaVA checkpoint (mounted); unset: serve $REPOSITORY as it is
#   BUILD_FLAGS  more `triton-vlm build` flags, e.g. "--gpus 2 --llm-param max_num_seqs=128"
#   REPOSITORY   where the repository is (default /repository)
# A repository already built there is reused: in Kubernetes it lives in an emptyDir, which outlives
# container restarts, so only the pod's first start pays for the ONNX export.
set -eu
REPOSITORY=${REPOSITORY:-/repository}
# vlm is written last: its config marks a finished build.
if [ -n "${MODEL_DIR:-}" ] && [ ! -f "$REPOSITORY/vlm/config.pbtxt" ]; then
  # shellcheck disable=SC2086  # BUILD_FLAGS holds several flags
  triton-vlm build --model "$MODEL_DIR" --output "$REPOSITORY" ${BUILD_FLAGS:-}
fi
exec triton-vlm serve --model-repository "$REPOSITORY" --host 0.0.0.0 "$@"

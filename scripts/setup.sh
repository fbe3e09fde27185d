#!/usr/bin/env bash
# Idempotent set-up: .venv with pinned dependencies, triton_vlm installed editable,
# the Python-backend stub placed where tritonserver finds it, and libb64 for perf_analyzer.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python

stamp=.venv/.triton-vlm-deps
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # This machine image keeps the CPU torch wheel on disk: use it rather than a multi-GB CUDA build.
  find_links=()
  [ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
  "$VPY" -m pip install --quiet --upgrade pip
  # torch first, pinned, so nothing later pulls a CUDA build.
  "$VPY" -m pip install --quiet "${find_links[@]}" "torch==2.13.0"
  "$VPY" -m pip install --quiet "${find_links[@]}" -e ".[test]"
  echo "$want" > "$stamp"
fi

# perf_analyzer needs Debian's libb64.
if ! ldconfig -p 2>/dev/null | grep -q libb64.so.0d; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq libb64-0d >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libb64-0d >/dev/null 2>&1; }) \
      || echo "setup: could not install libb64-0d; perf_analyzer will not run" >&2
  else
    echo "setup: apt-get unavailable; install libb64-0d for perf_analyzer" >&2
  fi
fi

# A C compiler builds the engine's CPU decode-attention kernel (engine/cpu_kernel.py); without one the
# engine keeps its slower torch path.
if ! command -v cc >/dev/null && ! command -v gcc >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq gcc libc6-dev >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq gcc libc6-dev >/dev/null 2>&1; }) \
      || echo "setup: could not install gcc; the engine will use its torch attention path" >&2
  else
    echo "setup: no C compiler; install gcc for the engine's CPU attention kernel" >&2
  fi
fi

.venv/bin/triton-vlm install-stub >/dev/null
echo "setup: ok (.venv ready)"

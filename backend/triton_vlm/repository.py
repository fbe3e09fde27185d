"""Render a ready Triton model repository for one checkpoint.

Every number in the configs comes from the checkpoint's config.json (via ModelGeometry);
the model.py files are the thin adapters kept in the project's model_repository/.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .geometry import ModelGeometry
from .limits import ServingLimits

ADAPTERS = Path(__file__).resolve().parents[2] / "model_repository"
VISION_BACKENDS = ("onnxruntime", "tensorrt")


@dataclass
class BuildOptions:
    vision_backend: str = "onnxruntime"
    vision_max_batch_size: int = 8
    vision_queue_delay_us: int = 2000  # how long dynamic batching waits to group images
    vision_instances: int = 1  # per GPU with gpus > 0
    # gpus > 0: llm runs one engine instance on each of GPUs 0..gpus-1 (KIND_GPU) and vision_encoder
    # is spread across them; vlm stays on CPU. 0: everything on CPU, llm with `llm_instances` engines.
    gpus: int = 0
    llm_instances: int = 1
    ort_intra_op_threads: int = 0
    limits: ServingLimits = field(default_factory=ServingLimits)  # what one vlm request may ask for
    llm: dict[str, str] = field(default_factory=dict)  # EngineConfig fields, e.g. {"block_size": "16"}
    image_cache_mb: float = 256.0  # vlm's LRU of image embeddings by content hash; 0 turns it off


def build_repository(checkpoint: str | Path, output: str | Path, options: BuildOptions | None = None) -> Path:
    options = options or BuildOptions()
    if options.vision_backend not in VISION_BACKENDS:
        raise ValueError(f"--vision-backend must be one of {VISION_BACKENDS}, got {options.vision_backend!r}")
    if options.gpus < 0 or options.llm_instances < 1:
        raise ValueError(f"--gpus must be >= 0 and --llm-instances >= 1, got {options.gpus} and {options.llm_instances}")
    if options.gpus and options.llm_instances != 1:
        raise ValueError("--llm-instances: with --gpus, llm runs one engine per GPU; leave --llm-instances at 1")
    checkpoint = Path(checkpoint).resolve()
    output = Path(output).resolve()
    geometry = ModelGeometry.from_checkpoint(checkpoint)
    served_by = family(geometry).VISION_BACKENDS
    if options.vision_backend not in served_by:  # refuse before touching the output
        raise ValueError(f"--vision-backend {options.vision_backend}: {geometry.family} checkpoints serve their vision "
                         f"encoder with {' or '.join(served_by)} only")
    if options.vision_backend == "tensorrt":
        from .export.tensorrt import require_tensorrt

        require_tensorrt()  # before the output is touched and the slow export runs
    for name in ("vision_encoder", "llm", "vlm"):
        if (output / name).exists():
            shutil.rmtree(output / name)
        (output / name / "1").mkdir(parents=True)

    _build_vision(checkpoint, output / "vision_encoder", geometry, options)
    _write(output / "llm", llm_config(checkpoint, options))
    _write(output / "vlm", vlm_config(checkpoint, options, geometry))
    return output


def _build_vision(checkpoint: Path, model_dir: Path, geometry: ModelGeometry, options: BuildOptions) -> None:
    """The family exports its tower and writes vision_encoder's config.pbtxt."""
    family(geometry).build_vision(checkpoint, model_dir, geometry, options)
    if options.vision_backend == "onnxruntime":  # the Python-backend adapter runs onnxruntime
        shutil.copy2(ADAPTERS / model_dir.name / "1" / "model.py", model_dir / "1" / "model.py")


def family(geometry: ModelGeometry):
    from .families import FAMILIES

    return FAMILIES[geometry.family]


def _write(model_dir: Path, config: str) -> None:
    (model_dir / "config.pbtxt").write_text(config)
    shutil.copy2(ADAPTERS / model_dir.name / "1" / "model.py", model_dir / "1" / "model.py")


def params_text(values: dict) -> str:
    """config.pbtxt string parameters."""
    return "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items())


def vision_config(g: ModelGeometry, o: BuildOptions) -> str:
    return family(g).vision_config(g, o)


def _gpu_list(o: BuildOptions) -> str:
    return ", ".join(str(i) for i in range(o.gpus))


def vision_group(o: BuildOptions, gpu_only: bool) -> str:
    """vision_encoder's instance_group entry (families' vision configs use it)."""
    if o.gpus:  # `count` instances on each listed GPU
        return f"{{ kind: KIND_GPU count: {o.vision_instances} gpus: [ {_gpu_list(o)} ] }}"
    return f"{{ kind: {'KIND_GPU' if gpu_only else 'KIND_CPU'} count: {o.vision_instances} }}"


def _llm_group(o: BuildOptions) -> str:
    """One engine per instance: one on each GPU, or llm_instances on CPU."""
    if o.gpus:
        return f"{{ kind: KIND_GPU count: 1 gpus: [ {_gpu_list(o)} ] }}"
    return f"{{ kind: KIND_CPU count: {o.llm_instances} }}"


def llm_config(checkpoint: Path, o: BuildOptions) -> str:
    return f"""name: "llm"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] optional: true }},
  {{ name: "image_embeds" data_type: TYPE_FP32 dims: [ -1, -1 ] optional: true }},
  {{ name: "image_rows" data_type: TYPE_INT64 dims: [ -1 ] optional: true }},
  {{ name: "image_hashes" data_type: TYPE_STRING dims: [ -1 ] optional: true }},
  {{ name: "position_ids" data_type: TYPE_INT64 dims: [ -1, -1 ] optional: true }},
  {{ name: "sampling_parameters" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "abort" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "ping" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "reply_to" data_type: TYPE_STRING dims: [ 1 ] optional: true }}
]
output [
  {{ name: "output_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "finish_reason" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "index" data_type: TYPE_UINT32 dims: [ 1 ] }},
  {{ name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "logprobs" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "cumulative_logprob" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "prompt_logprobs" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {_llm_group(o)} ]
{params_text({"checkpoint": checkpoint, **o.llm})}
"""


def _scalar_inputs() -> str:
    """TensorRT-LLM's per-setting inputs (triton/params.py SCALAR_INPUTS is their one home)."""
    from .triton.params import LIST_INPUTS, SCALAR_INPUTS

    return ",\n".join(f'  {{ name: "{name}" data_type: {dtype} dims: [ {-1 if name in LIST_INPUTS else 1} ] '
                       f'optional: true }}' for name, (dtype, _) in SCALAR_INPUTS.items())


def max_model_len(g: ModelGeometry, o: BuildOptions) -> int:
    """The engine's context length: the checkpoint's, or less if the llm params ask for less."""
    asked = int(o.llm.get("max_model_len") or 0)
    return min(asked or g.max_model_len, g.max_model_len)


def vlm_config(checkpoint: Path, o: BuildOptions, g: ModelGeometry | None = None) -> str:
    g = g or ModelGeometry.from_checkpoint(checkpoint)
    limits = o.limits.resolved(max_model_len(g, o))
    return f"""name: "vlm"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "ping" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "messages" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "image" data_type: TYPE_STRING dims: [ -1 ] optional: true }},
  {{ name: "image_uuid" data_type: TYPE_STRING dims: [ -1 ] optional: true }},
  {{ name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "sampling_parameters" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "exclude_input_in_output" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "return_finish_reason" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "return_num_input_tokens" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "return_num_output_tokens" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "return_logprobs" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "return_cumulative_logprob" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "return_prompt_logprobs" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
{_scalar_inputs()}
]
output [
  {{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "finish_reason" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "num_input_tokens" data_type: TYPE_UINT32 dims: [ 1 ] }},
  {{ name: "num_output_tokens" data_type: TYPE_UINT32 dims: [ -1 ] }},
  {{ name: "cumulative_logprob" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "logprobs" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "prompt_logprobs" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
{params_text({"checkpoint": checkpoint, "vision_max_batch_size": o.vision_max_batch_size,
              "vision_backend": o.vision_backend, "image_cache_mb": o.image_cache_mb, **limits.to_params()})}
"""

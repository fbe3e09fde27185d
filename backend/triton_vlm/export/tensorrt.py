"""Build a TensorRT engine (plan) for the vision encoder from its ONNX export."""
from __future__ import annotations

import warnings
from pathlib import Path

from triton_vlm.export.vision import INPUT_NAME


def require_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeError(
            "--vision-backend tensorrt needs the `tensorrt` Python package and a GPU; `import tensorrt` failed "
            f"({exc}). On an NVIDIA GPU host install tensorrt (pip install tensorrt), "
            "or use --vision-backend onnxruntime") from exc
    return tensorrt


def build_tensorrt_engine(onnx_path: str | Path, plan_path: str | Path, image_size: int, max_batch_size: int,
                          fp16: bool = True) -> Path:
    """Compile `onnx_path` into a serialized engine at `plan_path` for batches 1..max_batch_size."""
    trt = require_tensorrt()
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    one, full = (1, 3, image_size, image_size), (max_batch_size, 3, image_size, image_size)
    # opt = max: Triton's dynamic batcher fills batches under load, which is when speed matters.
    return _build(trt, onnx_path, plan_path, {INPUT_NAME: (one, full, full)}, fp16)


def patch_profile(input_shapes: dict[str, tuple], merge_unit: int, max_patches: int, opt_patches: int
                  ) -> dict[str, tuple[tuple, tuple, tuple]]:
    """An optimisation profile over the patch count for a ragged vision encoder (Qwen2-VL): each input's
    first axis counts patches, or merge blocks (patches / merge_unit) for window_index; the rest is fixed."""
    profile = {}
    for name, rest in input_shapes.items():
        per = merge_unit if name == "window_index" else 1
        profile[name] = tuple((n // per, *rest) for n in (merge_unit, opt_patches, max_patches))
    return profile


def build_tensorrt_ragged(onnx_path: str | Path, plan_path: str | Path, profile: dict, fp16: bool = True) -> Path:
    """Compile a ragged vision encoder with `profile` (patch_profile) as its one optimisation profile."""
    return _build(require_tensorrt(), onnx_path, plan_path, profile, fp16)


def _build(trt, onnx_path, plan_path, profile_shapes: dict[str, tuple[tuple, tuple, tuple]], fp16: bool) -> Path:
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except TypeError as exc:  # the binding's factory returns nullptr when no CUDA device is usable
        raise RuntimeError(f"TensorRT could not create a builder; is an NVIDIA GPU visible? ({exc})") from exc

    # TensorRT 10 made explicit batch the only mode (and the flag a no-op); 8.x still needs it.
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so that external-data weights next to the .onnx are found.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")

    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    for name, (low, _, _) in profile_shapes.items():
        if name not in inputs:
            raise ValueError(f"{onnx_path} has no input named {name!r}")
        shape = tuple(inputs[name].shape)
        if len(shape) != len(low) or any(d != -1 and d != want for d, want in zip(shape[1:], low[1:])):
            raise ValueError(f"{onnx_path}: {name} is {shape}, expected (*, {', '.join(map(str, low[1:]))})")

    config = builder.create_builder_config()
    if fp16:
        if hasattr(trt.BuilderFlag, "FP16"):
            config.set_flag(trt.BuilderFlag.FP16)
        else:
            # TensorRT 11 dropped weak typing: precision comes from the ONNX graph itself, which is FP32 here.
            warnings.warn(f"TensorRT {trt.__version__} has no FP16 builder flag; building in the ONNX model's "
                          "own precision (FP32)", stacklevel=3)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes.items():
        profile.set_shape(name, min=low, opt=opt, max=high)
    config.add_optimization_profile(profile)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(memoryview(plan))
    return plan_path

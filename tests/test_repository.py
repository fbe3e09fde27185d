"""Generated Triton configs: valid ModelConfig protobufs whose numbers come from the checkpoint."""
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from triton_vlm.geometry import ModelGeometry
from triton_vlm.repository import BuildOptions, build_repository, llm_config, vision_config, vlm_config
from triton_vlm.triton.params import SCALAR_INPUTS


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def built(second_checkpoint, tmp_path_factory):
    return build_repository(second_checkpoint, tmp_path_factory.mktemp("repo"),
                            BuildOptions(vision_max_batch_size=4, llm={"block_size": "32"}))


def test_every_generated_config_parses(built):
    for name in ("vision_encoder", "llm", "vlm"):
        cfg = parse((built / name / "config.pbtxt").read_text())
        assert cfg.name == name
        assert (built / name / "1" / "model.py").exists()
    assert (built / "vision_encoder" / "1" / "model.onnx").exists()


def test_vision_config_follows_the_checkpoint(built, second_checkpoint):
    g = ModelGeometry.from_checkpoint(second_checkpoint)
    cfg = parse((built / "vision_encoder" / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 4 and cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [3, 48, 48]
    # 'full' keeps CLS: (48/16)^2 + 1 rows of the text hidden size.
    assert list(cfg.output[0].dims) == [g.image_seq_len, g.text.hidden_size] == [10, 48]


def test_llm_and_vlm_are_decoupled_and_carry_the_checkpoint(built, second_checkpoint):
    for name in ("llm", "vlm"):
        cfg = parse((built / name / "config.pbtxt").read_text())
        assert cfg.model_transaction_policy.decoupled
        assert cfg.parameters["checkpoint"].string_value == str(second_checkpoint.resolve())
    llm = parse((built / "llm" / "config.pbtxt").read_text())
    assert llm.parameters["block_size"].string_value == "32"
    vlm = parse((built / "vlm" / "config.pbtxt").read_text())
    assert [i.name for i in vlm.input] == ["ping", "text_input", "messages", "image", "image_uuid", "stream",
                                           "sampling_parameters",
                                           "exclude_input_in_output", "return_finish_reason",
                                           "return_num_input_tokens", "return_num_output_tokens",
                                           "return_logprobs", "return_cumulative_logprob",
                                           "return_prompt_logprobs", *SCALAR_INPUTS]
    assert [o.name for o in vlm.output] == ["text_output", "finish_reason", "num_input_tokens", "num_output_tokens",
                                            "cumulative_logprob", "logprobs", "prompt_logprobs"]
    types = {i.name: model_config_pb2.DataType.Name(i.data_type) for i in vlm.input}
    assert all(types[name] == dtype for name, (dtype, _) in SCALAR_INPUTS.items())
    assert vlm.parameters["vision_max_batch_size"].string_value == "4"
    assert float(vlm.parameters["image_cache_mb"].string_value) == 256
    assert [i.name for i in llm.input][:4] == ["input_ids", "image_embeds", "image_rows", "image_hashes"]


def test_tensorrt_variant_parses_with_the_same_tensors(second_checkpoint):
    g = ModelGeometry.from_checkpoint(second_checkpoint)
    ort = parse(vision_config(g, BuildOptions()))
    trt = parse(vision_config(g, BuildOptions(vision_backend="tensorrt")))
    assert trt.platform == "tensorrt_plan" and trt.default_model_filename == "model.plan"
    assert trt.name == ort.name
    assert trt.input == ort.input and trt.output == ort.output
    assert trt.max_batch_size == ort.max_batch_size and trt.HasField("dynamic_batching")
    assert trt.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_tensorrt_build_without_tensorrt_fails_clearly(second_checkpoint, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here; tests/export/test_tensorrt.py covers the real build")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="--vision-backend tensorrt needs the `tensorrt` Python package"):
        build_repository(second_checkpoint, tmp_path, BuildOptions(vision_backend="tensorrt"))


def test_unknown_vision_backend_is_refused(second_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="--vision-backend"):
        build_repository(second_checkpoint, tmp_path, BuildOptions(vision_backend="openvino"))


def test_llm_and_vlm_configs_render_without_a_build(second_checkpoint):
    parse(llm_config(second_checkpoint, BuildOptions()))
    parse(vlm_config(second_checkpoint, BuildOptions()))


def test_gpus_give_llm_one_engine_per_gpu_and_spread_vision(second_checkpoint):
    g = ModelGeometry.from_checkpoint(second_checkpoint)
    options = BuildOptions(gpus=4, vision_instances=2)
    kind = model_config_pb2.ModelInstanceGroup
    (llm,) = parse(llm_config(second_checkpoint, options)).instance_group
    assert (llm.kind, llm.count, list(llm.gpus)) == (kind.KIND_GPU, 1, [0, 1, 2, 3])  # one instance per GPU
    for backend in ("onnxruntime", "tensorrt"):
        options.vision_backend = backend
        (vision,) = parse(vision_config(g, options)).instance_group
        assert (vision.kind, vision.count, list(vision.gpus)) == (kind.KIND_GPU, 2, [0, 1, 2, 3])
    (vlm,) = parse(vlm_config(second_checkpoint, options)).instance_group
    assert vlm.kind == kind.KIND_CPU and not vlm.gpus


def test_llm_instances_on_cpu(second_checkpoint, tmp_path):
    (llm,) = parse(llm_config(second_checkpoint, BuildOptions(llm_instances=3))).instance_group
    assert (llm.kind, llm.count) == (model_config_pb2.ModelInstanceGroup.KIND_CPU, 3)
    with pytest.raises(ValueError, match="--llm-instances"):
        build_repository(second_checkpoint, tmp_path, BuildOptions(gpus=2, llm_instances=2))
    with pytest.raises(ValueError, match="--gpus"):
        build_repository(second_checkpoint, tmp_path, BuildOptions(gpus=-1))

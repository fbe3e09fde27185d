"""Helpers shared by the tests: prompts, images, and transformers' LLaVA as the reference."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

TOY_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "toy-vlm"  # shipped: the default model
# A small pool keeps test servers light; 512 blocks of 16 tokens is ample for the test prompts.
LLM_PARAMS = {"num_kv_blocks": "512", "block_size": "16", "torch_threads": "1"}

# A second geometry: wider GQA ratio, head_dim not hidden/heads, last-layer features with CLS kept.
SECOND_GEOMETRY = dict(heads=8, kv_heads=2, head_dim=12, hidden=48, vision_feature_layer=-1, strategy="full",
                       image_size=48, patch_size=16, layers=3)


def photo(name: str, fmt: str = "PNG") -> bytes:
    """A real photo shipped inside scikit-image, re-encoded."""
    import skimage.data
    from PIL import Image

    arr = getattr(skimage.data, name)()
    img = Image.fromarray(arr).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


class HFReference:
    """Greedy outputs of transformers' own LLaVA for a checkpoint: the ground truth we must match."""

    def __init__(self, checkpoint: Path):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()

    def inputs(self, prompt: str, images: list[bytes]):
        from triton_vlm.preprocess import decode_image

        pil = [decode_image(b) for b in images]
        return self.processor(text=prompt, images=pil or None, return_tensors="pt")

    def generate_ids(self, prompt: str, images: list[bytes], max_new_tokens: int) -> list[int]:
        import torch

        inputs = self.inputs(prompt, images)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    def generate(self, prompt: str, images: list[bytes], max_new_tokens: int) -> str:
        ids = self.generate_ids(prompt, images, max_new_tokens)
        return self.processor.decode(ids, skip_special_tokens=True)


PROMPTS = {
    0: "USER: Tell me a story about a cat.\nASSISTANT:",
    1: "USER: <image>\nWhat is in this picture?\nASSISTANT:",
    2: "USER: <image>\n<image>\nHow do these two pictures differ?\nASSISTANT:",
}


def images_for(n: int, photos: dict[str, bytes]) -> list[bytes]:
    return [photos["chelsea"], photos["astronaut"]][:n]


def rng_image(seed: int, size=(40, 60)) -> bytes:
    from PIL import Image

    arr = (np.random.default_rng(seed).random((*size, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def serve(checkpoint, tmp_path_factory, name, llm: dict | None = None, limits=None, **build):
    """Build a repository for a checkpoint (`build`: more BuildOptions) and start a real tritonserver
    on free ports."""
    from triton_vlm.limits import ServingLimits
    from triton_vlm.repository import BuildOptions, build_repository
    from triton_vlm.server import TritonServer

    options = BuildOptions(llm={**LLM_PARAMS, **(llm or {})}, limits=limits or ServingLimits(), **build)
    repo = build_repository(checkpoint, tmp_path_factory.mktemp(name) / "repo", options)
    return TritonServer(repo, log_path=repo.parent / "server.log").start()


def start_openai(grpc_url: str, **media):
    """The OpenAI-compatible server on a free port, in this process; returns (handle, base URL)."""
    from triton_vlm.openai_api import OpenAIConfig, start
    from triton_vlm.remote_media import MediaPolicy
    from triton_vlm.server import free_port

    port = free_port()
    return start(OpenAIConfig(grpc_url, media=MediaPolicy(**media)), port=port), f"http://127.0.0.1:{port}"


def metric(server, name: str) -> float:
    import re
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url).read().decode()
    match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
    assert match, f"{name} not exported"
    return float(match.group(1))


def settled_metric(server, name: str, timeout: float = 10) -> float:
    """The metric once two reads 0.3 s apart agree: the stubs publish up to 100 ms late, so an earlier
    request's counts may still be on their way."""
    import time

    deadline, last = time.monotonic() + timeout, None
    while (value := metric(server, name)) != last and time.monotonic() < deadline:
        last = value
        time.sleep(0.3)
    return value


def metric_by_instance(server, name: str) -> dict[str, float]:
    """One engine gauge per llm instance (label `model_instance`, e.g. llm_0_1)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url).read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^{name}{{[^}}]*model_instance="([^"]+)"[^}}]*}} (\S+)$', text, re.M)}


def wait_for_metric(server, name: str, want: float, timeout: float = 10) -> float:
    """The metric once it equals `want`, or its last value after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while (value := metric(server, name)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def stub_pids(server) -> dict[str, int]:
    """The server's Python-backend stubs by instance name (e.g. llm_0_0)."""
    import psutil

    stubs = {}
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        argv = child.cmdline()
        if argv and argv[0].endswith("triton_python_backend_stub"):
            stubs[argv[-2]] = child.pid
    return stubs


def scrape(server) -> list[tuple[str, dict, float]]:
    """Every sample on the metrics port as (name, labels, value)."""
    import re
    import urllib.request

    samples = []
    for line in urllib.request.urlopen(server.metrics_url).read().decode().splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def sample(samples, name: str, **labels) -> float:
    """The one sample of `name` whose labels include `labels` (0 when there is none yet)."""
    found = [v for n, ls, v in samples if n == name and labels.items() <= ls.items()]
    assert len(found) <= 1, f"{name} {labels}: {len(found)} samples"
    return found[0] if found else 0.0


QWEN_PROMPTS = {
    0: "<|im_start|>user\nTell me a story about a cat.<|im_end|>\n<|im_start|>assistant\n",
    1: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in this picture?<|im_end|>\n"
       "<|im_start|>assistant\n",
    2: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and <|vision_start|><|image_pad|><|vision_end|>"
       "How do they differ?<|im_end|>\n<|im_start|>assistant\n",
}


class QwenReference:
    """transformers' own Qwen2-VL / Qwen2.5-VL: image processor (PIL), placeholder expansion as
    Qwen2VLProcessor does it (grid t*h*w / merge^2 copies), positions by the model's get_rope_index."""

    def __init__(self, checkpoint: Path):
        from transformers import AutoModelForImageTextToText, AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
        self.model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
        self.image_token_id = self.model.config.image_token_id

    def inputs(self, prompt: str, images: list) -> dict:
        import torch
        from PIL import Image

        from triton_vlm.preprocess import decode_image

        pil = [img if isinstance(img, Image.Image) else decode_image(img) for img in images]
        kw = {}
        if pil:
            out = self.image_processor(images=pil, return_tensors="pt")
            kw = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
            merge = self.image_processor.merge_size ** 2
            parts = prompt.split("<|image_pad|>")
            prompt = "".join(p + "<|image_pad|>" * int(g.prod() // merge) for p, g in zip(parts, out["image_grid_thw"]))
            prompt += parts[-1]
        ids = torch.tensor([self.tokenizer(prompt)["input_ids"]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": (ids == self.image_token_id).int(), **kw}

    def image_embeds(self, inputs: dict):
        import torch

        with torch.no_grad():
            return torch.cat(self.model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).pooler_output)

    def generate_ids(self, prompt: str, images: list, max_new_tokens: int) -> list[int]:
        import torch

        inputs = self.inputs(prompt, images)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    def generate(self, prompt: str, images: list, max_new_tokens: int) -> str:
        return self.tokenizer.decode(self.generate_ids(prompt, images, max_new_tokens), skip_special_tokens=True)

    def generate_video(self, prompt: str, frames: list, max_new_tokens: int, fps: float = 2.0) -> str:
        """One <|video_pad|> placeholder in `prompt`, the video's sampled frames taken `fps` apart."""
        import torch

        pixels, grid = qwen_video_patches(self.image_processor, frames)
        n = int(grid.prod()) // self.image_processor.merge_size ** 2
        ids = torch.tensor([self.tokenizer(prompt.replace("<|video_pad|>", "<|video_pad|>" * n))["input_ids"]])
        kw = {}
        if self.model.config.model_type == "qwen2_5_vl":
            kw["second_per_grid_ts"] = torch.tensor([self.image_processor.temporal_patch_size / fps])
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels,
                                      video_grid_thw=grid, mm_token_type_ids=2 * (ids == self.model.config.video_token_id).int(),
                                      max_new_tokens=max_new_tokens, do_sample=False, **kw)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def rng_pil(seed: int, height: int, width: int):
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


def qwen_video_patches(image_processor, frames) -> tuple:
    """pixel_values_videos and video_grid_thw of one video, laid out as transformers' Qwen2VLVideoProcessor
    does (its module needs torchvision, so its patchify is restated here): frames resized as the image
    processor resizes, rescaled and normalised; the last frame repeated to fill the final temporal group."""
    import torch
    from PIL import Image

    p, m, tp = image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    grid = image_processor(images=[frames[0]], return_tensors="np")["image_grid_thw"][0]
    height, width = int(grid[1]) * p, int(grid[2]) * p
    mean, std = np.array(image_processor.image_mean), np.array(image_processor.image_std)
    arrays = [((np.asarray(f.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32)
                * image_processor.rescale_factor - mean) / std).transpose(2, 0, 1) for f in frames]
    arrays += [arrays[-1]] * (-len(arrays) % tp)
    video = torch.tensor(np.stack(arrays)[None], dtype=torch.float32)  # [1, frames, C, H, W]
    gt, gh, gw = video.shape[1] // tp, height // p, width // p
    patches = video.view(1, gt, tp, 3, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(gt * gh * gw, 3 * tp * p * p), torch.tensor([[gt, gh, gw]])


def ask(server, protocol: str, stream: bool, prompt: str, images: list[bytes], sampling: dict) -> str:
    """vlm's whole text output over gRPC or HTTP, streamed or not."""
    from triton_vlm import client

    if protocol == "grpc":
        return client.generate_grpc(server.grpc_url, prompt, images, sampling, stream=stream)
    if stream:
        return "".join(client.stream_http(server.http_url, prompt, images, sampling))
    return client.generate_http(server.http_url, prompt, images, sampling)

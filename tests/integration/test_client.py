"""triton_vlm.client against a real tritonserver serving the toy model: right answers about freshly drawn
scenes, in batch order, through the vLLM-style and LMDeploy-style interfaces."""
from __future__ import annotations

import random

import pytest

from triton_vlm import client
from triton_vlm.client import LLM, GenerationConfig, SamplingParams, pipeline
from triton_vlm.toy import evaluate as ev
from triton_vlm.toy.scenes import ask, render, sample_scene

GREEDY = SamplingParams(temperature=0, max_tokens=16)
SIZE = 48


def scenes(n: int, seed: str, qtypes=("colour", "count", "shape")):
    """n (image, question, answer), drawn here (not from the training or held-out streams)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = sample_scene(rng)
        question, answer = ask(scene, qtypes[i % len(qtypes)], rng)
        out.append((render(scene, SIZE), question, answer))
    return out


def llava(question: str) -> str:
    return f"USER: <image>\n{question}\nASSISTANT:"


def test_generate_answers_a_batch_in_order(toy_server, capsys):
    cases = scenes(40, "client-batch")
    prompts = [{"prompt": llava(q), "multi_modal_data": {"image": img}} for img, q, _ in cases]
    outs = LLM(toy_server.grpc_url, max_in_flight=16).generate(prompts, GREEDY)
    answers = [o.outputs[0].text.strip() for o in outs]
    right = sum(a == truth for a, (_, _, truth) in zip(answers, cases))
    assert right >= 38, list(zip(answers, [c[2] for c in cases]))
    assert [o.prompt for o in outs] == [p["prompt"] for p in prompts]
    assert all(o.outputs[0].finish_reason == "stop" and o.num_prompt_tokens > 9 for o in outs)
    assert "40/40" in capsys.readouterr().err  # the progress bar of a large batch
    # Concurrency changes nothing: each answer is the one the request gets alone.
    img, q, _ = cases[7]
    assert client.generate_grpc(toy_server.grpc_url, llava(q), [ev.png_bytes(img)], GREEDY.to_dict()) == \
        outs[7].outputs[0].text


def test_generate_takes_one_prompt_and_every_image_form(toy_server, tmp_path):
    img, question, answer = scenes(1, "client-forms", ("colour",))[0]
    path = tmp_path / "scene.png"
    img.save(path)
    llm = LLM(toy_server.grpc_url)
    for form in (img, str(path), path.read_bytes()):
        (out,) = llm.generate({"prompt": llava(question), "multi_modal_data": {"image": form}}, GREEDY)
        assert out.outputs[0].text.strip() == answer


def test_server_errors_name_the_request(toy_server):
    img, question, _ = scenes(1, "client-errors")[0]
    prompts = [{"prompt": llava(question), "multi_modal_data": {"image": img}}] * 2
    with pytest.raises(client.VLMError, match=r"request [01]: .*max_tokens"):
        LLM(toy_server.grpc_url).generate(prompts, SamplingParams(max_tokens=10**6))


def test_pipeline_answers_tuples_in_either_order(toy_server):
    pipe = pipeline(toy_server.grpc_url)
    (img, question, answer), *rest = scenes(6, "client-pipeline")
    assert pipe((question, img)).text == answer
    assert pipe((img, question)).text == answer
    responses = pipe([(q, im) for im, q, _ in rest])
    assert [r.text for r in responses] == [a for _, _, a in rest]
    assert responses[0].finish_reason == "stop" and responses[0].input_token_len > 9


def test_llm_chat_takes_openai_messages(toy_server):
    img, question, answer = scenes(1, "client-llm-chat", ("colour",))[0]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                             {"type": "text", "text": question}]}]
    (out,) = LLM(toy_server.grpc_url).chat(messages, GREEDY)
    assert out.outputs[0].text.strip() == answer


def test_chat_follow_up_about_the_same_image(toy_server):
    """"What colour is the X?" then "And the Y?": the second answer needs the first turn."""
    pipe = pipeline(toy_server.grpc_url, gen_config=GenerationConfig(max_new_tokens=16))
    rng = random.Random("client-chat")
    right = 0
    for _ in range(5):
        scene = sample_scene(rng, 3)
        first, second = rng.sample(scene.shapes, 2)
        sess = pipe.chat((f"What colour is the {first.kind}?", render(scene, SIZE)))
        assert sess.response.text == first.colour
        sess = pipe.chat(f"And the {second.kind}?", session=sess)
        right += sess.response.text == second.colour
        assert sess.history[1] == (f"And the {second.kind}?", sess.response.text)
    assert right >= 4


def write_clip(path, image, frames: int = 12):
    """An MP4 showing `image` for `frames` frames."""
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width, stream.height = image.size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_video_frames_go_as_images(toy_server, tmp_path):
    img, question, answer = scenes(1, "client-video", ("colour",))[0]
    clip = write_clip(tmp_path / "clip.mp4", img)
    llm = LLM(toy_server.grpc_url, num_frames=4)
    (out,) = llm.generate({"prompt": f"USER: <video>\n{question}\nASSISTANT:", "multi_modal_data": {"video": str(clip)}},
                          GREEDY)
    assert out.outputs[0].text.strip() == answer
    (one,) = llm.generate({"prompt": llava(question), "multi_modal_data": {"image": img}}, GREEDY)
    assert out.num_prompt_tokens - one.num_prompt_tokens == 3 * (9 + 1)  # 3 more frames: 9 image tokens + "\n" each
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": str(clip)}},
                                             {"type": "text", "text": question}]}]
    assert pipeline(toy_server.grpc_url, num_frames=4)(messages).text == answer


def test_ask_chat_in_the_terminal(toy_server, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from triton_vlm.toy.scenes import Scene, Shape

    scene = Scene([Shape("circle", "red", 0.17, 0.5, 0.13), Shape("square", "blue", 0.83, 0.18, 0.12)],
                  background=(236, 232, 220), noise=0.0, noise_seed=0)
    render(scene, SIZE).save(tmp_path / "scene.png")
    ask_py = Path(__file__).resolve().parents[2] / "clients" / "ask.py"
    run = subprocess.run([sys.executable, str(ask_py), "--chat", "--url", toy_server.grpc_url,
                          "What colour is the circle?", str(tmp_path / "scene.png")],
                         input="And the square?\nHow many shapes are there?\n\n", capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    answers = [line.split("ASSISTANT: ", 1)[1] for line in run.stdout.splitlines() if "ASSISTANT: " in line]
    assert answers == ["red", "blue", "two"]

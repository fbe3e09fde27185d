"""LMDeploy's VLM pipeline interface against a running triton-vlm server.

    from triton_vlm.client import pipeline, GenerationConfig
    pipe = pipeline("127.0.0.1:8001")
    pipe(("Describe the image.", img)).text
    pipe([("What colour is the circle?", img1), ("Describe both.", [img1, img2])])
    sess = pipe.chat(("What shape is red?", img)); sess.response.text
    sess = pipe.chat("And the blue one?", session=sess)

Prompts become OpenAI-style messages that the server renders with the checkpoint's chat template. The
server keeps no session: a chat resends its history each turn (the prefix cache makes that cheap).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .conversation import from_prompt
from .llm import LLM, SamplingParams
from .media import DEFAULT_FRAMES


@dataclass
class GenerationConfig:
    """LMDeploy's names; do_sample=False (its default) is greedy decoding."""
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 50
    random_seed: int | None = None
    stop_words: list[str] | None = None
    stop_token_ids: list[int] | None = None

    def sampling_params(self) -> SamplingParams:
        sample = self.do_sample and self.temperature > 0
        return SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature if sample else 0,
                              top_p=self.top_p if sample else None, top_k=self.top_k if sample else None,
                              seed=self.random_seed, stop=self.stop_words or None,
                              stop_token_ids=self.stop_token_ids or None)


@dataclass
class Response:
    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None  # "stop" or "length"
    index: int = 0


@dataclass
class Session:
    """One chat: the messages so far (the last one the model's answer) and the latest response."""
    session_id: int
    messages: list[dict] = field(default_factory=list)
    response: Response | None = None

    @property
    def history(self) -> list[tuple[str, str]]:
        """(user text, answer) per turn."""
        turns = zip(self.messages[0::2], self.messages[1::2])
        return [(_text(u), _text(a)) for u, a in turns]


class Pipeline:
    def __init__(self, url: str = "127.0.0.1:8001", gen_config: GenerationConfig | None = None,
                 timeout: float = 600, num_frames: int = DEFAULT_FRAMES):
        self.llm = LLM(url, timeout=timeout, num_frames=num_frames)
        self.gen_config = gen_config or GenerationConfig()
        self._sessions = 0

    def __call__(self, prompts, gen_config: GenerationConfig | None = None, use_tqdm: bool | None = None):
        """One prompt -> one Response; a list of prompts -> a list, in order. A prompt is a text, a
        (text, image or [images]) tuple (either order), or a list of OpenAI-style messages."""
        single = not (isinstance(prompts, list) and prompts and not _is_messages(prompts))
        batch = [prompts] if single else prompts
        outs = self.llm.chat([from_prompt(p) for p in batch], (gen_config or self.gen_config).sampling_params(),
                             use_tqdm)
        responses = [_response(o, i) for i, o in enumerate(outs)]
        return responses[0] if single else responses

    def chat(self, prompt, session: Session | None = None, gen_config: GenerationConfig | None = None) -> Session:
        """Ask one more question in `session` (a new one if None); returns the session, answer in .response."""
        if session is None:
            self._sessions += 1
            session = Session(self._sessions)
        messages = session.messages + from_prompt(prompt)
        session.response = self([messages], gen_config)[0]
        session.messages = messages + [{"role": "assistant", "content": session.response.text}]
        return session


def pipeline(url: str = "127.0.0.1:8001", **kwargs) -> Pipeline:
    """LMDeploy's entry point; `url` is the server's gRPC address where LMDeploy takes a model path."""
    return Pipeline(url, **kwargs)


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m for m in x)


def _response(out, index: int) -> Response:
    c = out.outputs[0]
    return Response(c.text.strip(), c.num_tokens, out.num_prompt_tokens, c.finish_reason, index)


def _text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))

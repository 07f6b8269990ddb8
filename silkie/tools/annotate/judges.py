"""Who answers the rubric: an OpenAI-compatible endpoint (the `openai` client: GPT-4o, `vllm serve`, any compatible
server), a local checkpoint of any family, or a Python function (a rule-based or custom judge)."""

from __future__ import annotations

import base64
import importlib
import io
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from silkie.config.annotate import JudgeConfig, PoolModel
from silkie.tools.cli import ToolError, read_image


@dataclass
class Reply:
    """A judge's raw reply and the tokens it cost."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    cut_short: bool = False  # stopped at the judge's max_tokens (finish_reason "length")


JudgeCall = Callable[[str, Path, Sequence[str]], Reply]  # (rubric prompt, image file, answers) -> reply
API_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


class PermanentJudgeError(ToolError):
    """An endpoint error that retrying cannot fix (bad key, unknown model): the run stops."""


def image_data_url(path: Path) -> str:
    """The image as a `data:` URL (how the chat-completions API takes a local picture); formats the API does not
    take (BMP, TIFF, ...) are re-encoded as PNG, upright and RGB as training reads them."""
    from PIL import Image

    with Image.open(path) as image:
        kind = API_FORMATS.get(image.format or "")
    if kind is not None:
        return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"
    buffer = io.BytesIO()
    read_image(path).save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def openai_judge(config: JudgeConfig) -> JudgeCall:
    """Chat completions with the image and the rubric in one user turn; retries are the caller's (the client's
    own are off, so every attempt is counted and backed off the same way)."""
    try:
        import openai
    except ImportError as err:
        raise ToolError("judge.kind openai needs the openai client: pip install -e .[annotate]") from err
    key = os.environ.get(config.api_key_env)
    if not key and config.base_url is None:
        raise ToolError(f"judge: set {config.api_key_env} (judge.api_key_env) for api.openai.com")
    client = openai.OpenAI(
        base_url=config.base_url, api_key=key or "none", timeout=config.timeout_seconds, max_retries=0
    )

    permanent = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)

    def call(prompt: str, image: Path, answers: Sequence[str]) -> Reply:
        try:
            response = create(prompt, image)
        except openai.APIStatusError as err:
            if isinstance(err, permanent) or _code(err) == "insufficient_quota":  # a 429 that waiting cannot fix
                raise PermanentJudgeError(f"judge endpoint refused the request ({type(err).__name__}): {err}") from err
            raise
        usage, choice = response.usage, response.choices[0]
        return Reply(
            choice.message.content or "",
            getattr(usage, "prompt_tokens", 0) or 0,
            getattr(usage, "completion_tokens", 0) or 0,
            cut_short=choice.finish_reason == "length",
        )

    def create(prompt: str, image: Path):
        return client.chat.completions.create(
            model=config.model,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                        {"type": "text", "text": prompt},
                    ],
                }
            ],
            max_tokens=config.max_tokens,
            temperature=config.temperature,
        )

    return call


def _code(err: Exception) -> str | None:
    """The error code an OpenAI-compatible endpoint put in its error body (`insufficient_quota`, ...)."""
    code = getattr(err, "code", None)
    if code is None and isinstance(getattr(err, "body", None), dict):
        body = err.body.get("error", err.body)
        code = body.get("code") if isinstance(body, dict) else None
    return str(code) if code is not None else None


def local_judge(config: JudgeConfig, device: str = "auto") -> JudgeCall:
    """A checkpoint (+ adapter) of any family answering the rubric with its image, as `silkie chat` would."""
    from silkie.tools.annotate.sample import Responder

    spec = PoolModel(config.model, "judge", config.adapter, config.max_tokens, config.temperature, 1.0,
                     chat_template_kwargs=config.chat_template_kwargs)  # fmt: skip
    responder = Responder(spec, device)
    attempts: Counter = Counter()

    def call(prompt: str, image: Path, answers: Sequence[str]) -> Reply:
        attempts[prompt] += 1
        if attempts[prompt] > 1:  # a greedy retry would repeat the same reply: sample, with a new seed
            responder.options.sample, responder.options.temperature = True, max(config.temperature, 0.7)
        answer = responder.reply(image, prompt, seed=attempts[prompt] - 1)
        responder.options.sample, responder.options.temperature = config.temperature > 0, config.temperature or 1.0
        return Reply(answer.text, answer.prompt_tokens, answer.answer_tokens, cut_short=not answer.stopped)

    return call


def python_judge(config: JudgeConfig) -> JudgeCall:
    """`judge.function` (`module:function(prompt, image_path, answers) -> str`), its reply parsed as any judge's."""
    module_name, _, name = str(config.function).partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ToolError(f"judge.function {config.function!r}: {err}") from err
    return lambda prompt, image, answers: Reply(str(function(prompt, str(image), list(answers))))


def make_judge(config: JudgeConfig, device: str = "auto") -> JudgeCall:
    """The judge `config.kind` names."""
    if config.kind == "openai":
        return openai_judge(config)
    if config.kind == "local":
        return local_judge(config, device)
    return python_judge(config)

"""`silkie annotate serve`: a local checkpoint (any family, + adapter) behind an OpenAI-compatible
`/v1/chat/completions` endpoint, so a judge (or a pool model) on a GPU box serves `kind: openai` clients where vLLM
is not installed. One user turn with one image (a `data:` URL or a local file path) and text; requests are answered
one at a time; `usage` counts prompt and completion tokens."""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from silkie.config.annotate import PoolModel
from silkie.tools.cli import ToolError, run_cli

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A request this server cannot answer (HTTP 400 with the reason)."""


def read_request(body: dict[str, Any], scratch: Path) -> tuple[Path | None, str]:
    """(image file or None, text) of a chat-completions request's last user turn."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list")
    turn = messages[-1]
    if not isinstance(turn, dict) or turn.get("role") != "user":
        raise BadRequest("the last message must be the user's")
    content = turn.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise BadRequest("`content` must be a string or a list of parts")
    texts, images = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            images.append(_image_file(str((part.get("image_url") or {}).get("url", "")), scratch))
        else:
            raise BadRequest(f"unsupported content part {kind!r} (text and image_url are)")
    if len(images) > 1:
        raise BadRequest("one image per request")
    return (images[0] if images else None), "\n".join(texts)


def _image_file(url: str, scratch: Path) -> Path:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise BadRequest("a data: URL image must be base64")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise BadRequest(f"bad base64 image: {err}") from None
        path = scratch / f"{uuid.uuid4().hex}.img"
        path.write_bytes(raw)
        return path
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise BadRequest(f"image not found: {url[:200]} (send a data: URL or a path on the server)")
    return path


class ModelServer:
    """The loaded model answering requests, one at a time."""

    def __init__(self, spec: PoolModel, device: str = "auto"):
        from silkie.tools.annotate.sample import Responder

        self.spec = spec
        self.responder = Responder(spec, device)
        self.lock = threading.Lock()
        self.scratch = Path(tempfile.mkdtemp(prefix="silkie-serve-"))

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """The chat-completions response to `body`."""
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        try:
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or self.spec.max_new_tokens)
            temperature = float(body.get("temperature", self.spec.temperature) or 0.0)
        except (TypeError, ValueError) as err:
            raise BadRequest(f"max_tokens / temperature: {err}") from None
        image, text = read_request(body, self.scratch)
        if image is None:
            raise BadRequest("an image is needed (these are vision-language models)")
        try:
            return self._answer(body, image, text, max_tokens, temperature)
        finally:
            if image.parent == self.scratch:  # a decoded upload, not a server-side file
                image.unlink(missing_ok=True)

    def _answer(self, body: dict, image: Path, text: str, max_tokens: int, temperature: float) -> dict[str, Any]:
        with self.lock:
            options = self.responder.options
            options.max_new_tokens, options.sample = max_tokens, temperature > 0
            options.temperature = temperature or 1.0
            answer, prompt, completion, stopped = self.responder.reply(image, text, seed=int(body.get("seed") or 0))
        finish = "stop" if stopped else "length"  # as the API says of a reply cut at max_tokens
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.spec.label,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }


def make_handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    """The HTTP handler class bound to `server`."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": server.spec.label, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length < 0:
                    raise BadRequest("bad Content-Length")
                self._send(200, server.complete(json.loads(self.rfile.read(length) or b"{}")))
            except (ValueError, ToolError) as err:  # the request's fault (bad JSON, sizes, markers, encoding)
                self._send(400, {"error": {"message": str(err), "type": "invalid_request_error"}})
            except Exception as err:  # the model failed: the client sees a 500 and may retry
                log.exception("request failed")
                self._send(500, {"error": {"message": f"{type(err).__name__}: {err}", "type": "server_error"}})

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="silkie annotate serve", description=__doc__)
    parser.add_argument("--model", required=True, help="checkpoint folder (any family)")
    parser.add_argument("--adapter", help="LoRA adapter folder on top of --model")
    parser.add_argument("--name", help="the model name clients ask for (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (8000; 0 picks a free one)")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="default answer length limit (1024)")
    parser.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: GPU when present)")
    parser.add_argument(
        "--chat-template-kwargs",
        type=template_kwargs,
        help="variables of the chat template as a YAML mapping, e.g. '{enable_thinking: false}' (default: those of "
        "the adapter's run, else none)",
    )
    return parser.parse_args(argv)


def template_kwargs(text: str) -> dict:
    """`--chat-template-kwargs`: a YAML mapping of the template's variables, checked as a recipe's."""
    import yaml

    from silkie.config.model_section import check_chat_template_kwargs
    from silkie.config.yaml_io import parse_yaml
    from silkie.errors import RecipeError

    try:
        value = parse_yaml(text)
        check_chat_template_kwargs(value, "--chat-template-kwargs")
    except (RecipeError, yaml.YAMLError) as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return value


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted; prints `serving http://HOST:PORT/v1` once ready."""
    if not Path(args.model).is_dir():
        raise ToolError(f"model folder not found: {args.model}")
    spec = PoolModel(args.model, args.name, args.adapter, args.max_new_tokens, 0.0, 1.0, args.dtype,
                     chat_template_kwargs=args.chat_template_kwargs)  # fmt: skip
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(ModelServer(spec, args.device)))
    host, port = httpd.server_address[:2]
    print(f"serving http://{host}:{port}/v1 ({spec.label})", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: serves until Ctrl-C (exit 130), or 2 with a one-line error."""
    return run_cli(run, parse_args(argv))

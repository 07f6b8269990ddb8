"""The judge stage without models: the order answers are shown in, empty answers, a reply with prose around its
JSON, an endpoint out of quota, and an interrupted run that keeps the replies it paid for."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from silkie.config.annotate import JudgeConfig
from silkie.tools.annotate.files import Instruction
from silkie.tools.annotate.judge import judge_answers, shown_order
from silkie.tools.annotate.judges import Reply
from silkie.tools.annotate.rubric import parse_ratings
from silkie.tools.cli import ToolError

ASPECTS = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")


def folder(tmp_path: Path, answers: dict[str, list[str]]) -> tuple[Path, list[Instruction]]:
    """An annotation folder whose instructions have these answers (by models m0, m1, ...)."""
    out = tmp_path / "ann"
    out.mkdir()
    lines = [json.dumps({"id": key, "model": f"m{i}", "response": text}) for key, texts in answers.items()
             for i, text in enumerate(texts)]  # fmt: skip
    (out / "answers.jsonl").write_text("\n".join(lines) + "\n")
    return out, [Instruction(key, f"question {key}", "img.png") for key in answers]


def reply(ratings: list[int]) -> str:
    """A rubric reply rating answer k with ratings[k-1] on every aspect."""
    entries = [{"answer": k, **{a: {"rating": r, "rationale": "."} for a in ASPECTS}} for k, r in enumerate(ratings, 1)]
    return json.dumps({"ratings": entries})


def failing_judge(message: str):
    """(the calls made, a judge whose every request fails with `message`)."""
    calls = []

    def judge(prompt, image, texts):
        calls.append(1)
        raise ConnectionError(message)

    return calls, judge


def ratings_file(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "ratings.jsonl").read_text().splitlines())}


def test_answers_are_shown_shuffled_and_their_ratings_come_back_to_their_models(tmp_path):
    """A judge that rates whatever it is shown first 5 and the rest 1 (pure position bias): the 5 lands on the
    model shown first, which is not always the pool's first model."""
    answers = {f"q{i}": [f"answer {m} of q{i}" for m in range(3)] for i in range(12)}
    out, instructions = folder(tmp_path, answers)
    seen = []

    def position_biased(prompt, image, texts):
        seen.append(list(texts))
        return Reply(reply([5] + [1] * (len(texts) - 1)))

    config = JudgeConfig(kind="python", function="x:y")
    result = judge_answers(config, position_biased, instructions, out, progress=False)
    assert result["new"] == 12
    firsts = set()
    for key, record in ratings_file(out).items():
        order = shown_order(key, 3)
        assert record["shown_order"] == order and record["models"] == ["m0", "m1", "m2"]
        top = [int(a["Helpfulness"]["Rating"]) for a in record["annotations"]].index(5)
        assert top == order[0]  # the first one shown, mapped back to its model
        firsts.add(order[0])
    assert firsts == {0, 1, 2} and sorted(map(tuple, seen)) == sorted(
        tuple(answers[key][i] for i in shown_order(key, 3)) for key in answers
    )
    assert [shown_order("q1", 3)] * 2 == [shown_order("q1", 3), shown_order("q1", 3)]  # the same on a rerun


def test_empty_answers_are_not_sent_and_an_instruction_needs_two_others(tmp_path):
    out, instructions = folder(tmp_path, {"a": ["one", "", "two"], "b": ["   ", "only"]})
    sent = []

    def judge(prompt, image, texts):
        sent.append(list(texts))
        return Reply(reply([3] * len(texts)))

    result = judge_answers(JudgeConfig(kind="python", function="x:y"), judge, instructions, out, progress=False)
    assert sorted(map(sorted, sent)) == [["one", "two"]]
    assert ratings_file(out)["a"]["models"] == ["m0", "m2"] and result["skipped_one_answer"] == 1


def test_a_reply_with_prose_and_braces_around_its_json_is_read():
    text = f"Here are my ratings for {{image}}:\n{reply([4, 2])}\nNote: answer {{2}} was vague."
    assert [a["Helpfulness"]["Rating"] for a in parse_ratings(text, 2)] == ["4", "2"]
    assert parse_ratings("```json\n" + reply([5]) + "\n```", 1)[0]["Ethical Considerations"]["Rating"] == "5"


@pytest.fixture
def endpoint():
    """A chat-completions server whose answer the test sets: (status, body) per request, or a delay first."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = {"status": 200, "body": {}, "delay": 0.0, "requests": 0, "first": None, "times": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            state["requests"] += 1
            state["times"].append(time.monotonic())
            time.sleep(state["delay"])
            status, body, headers = state["first"] or (state["status"], state["body"], {})
            state["first"] = None
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    server.shutdown()


def openai_config(url: str, **extra) -> JudgeConfig:
    pytest.importorskip("openai")
    return JudgeConfig(kind="openai", model="m", base_url=url, backoff_seconds=0, max_retries=3, **extra)


def completion(text: str) -> dict:
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}  # fmt: skip


def test_an_endpoint_out_of_quota_stops_at_the_first_request(endpoint, tmp_path):
    from PIL import Image

    from silkie.tools.annotate.judges import PermanentJudgeError, make_judge

    url, state = endpoint
    state["status"] = 429
    state["body"] = {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                               "code": "insufficient_quota"}}  # fmt: skip
    out, instructions = folder(tmp_path, {f"q{i}": ["a", "b"] for i in range(6)})
    Image.new("RGB", (8, 8)).save(out / "img.png")
    config = openai_config(url, concurrency=1)
    with pytest.raises(PermanentJudgeError, match="RateLimitError"):
        judge_answers(config, make_judge(config), instructions, out, progress=False)
    assert state["requests"] == 1  # a plain 429 is retried; no quota is not


def test_ctrl_c_keeps_the_replies_in_flight(endpoint, tmp_path):
    """Interrupted while requests are out: they are waited for and recorded (they are paid for); no new ones go."""
    import signal

    from PIL import Image

    from silkie.tools.annotate.judges import make_judge

    url, state = endpoint
    state["body"], state["delay"] = completion(reply([4, 2])), 1.0
    out, instructions = folder(tmp_path, {f"q{i}": ["a", "b"] for i in range(8)})
    Image.new("RGB", (8, 8)).save(out / "img.png")
    config = openai_config(url, concurrency=2)
    # a real SIGINT to the main thread while the first two requests are out (as Ctrl-C: it wakes a blocked wait)
    main_thread = threading.main_thread().ident
    threading.Timer(0.5, signal.pthread_kill, (main_thread, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        judge_answers(config, make_judge(config), instructions, out, progress=False)
    rated = ratings_file(out)
    usage = json.loads((out / "judge_usage.json").read_text())
    assert len(rated) == state["requests"] == usage["requests"] == 2  # both in flight: kept, and nothing after
    assert usage["input_tokens"] == 200 and usage["output_tokens"] == 40


def test_the_stop_after_failed_requests_spares_the_rest(tmp_path):
    out, instructions = folder(tmp_path, {f"q{i:02d}": ["a", "b"] for i in range(30)})
    calls, refusing = failing_judge("400 Bad Request: unsupported parameter max_tokens")
    config = JudgeConfig(kind="python", function="x:y", max_retries=0, backoff_seconds=0)
    with pytest.raises(ToolError, match=r"the last 8 instructions all failed .*unsupported parameter max_tokens"):
        judge_answers(config, refusing, instructions, out, progress=False)
    # 8 in a row (one worker, one instruction at a time), and the other 22 never sent
    assert len(calls) == 8 and len((out / "judge_failures.jsonl").read_text().splitlines()) == 8


def test_an_instruction_with_several_pictures_or_a_video_is_refused_by_name(tmp_path):
    from PIL import Image

    from silkie.tools.annotate.files import import_instructions

    images = tmp_path / "pictures"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(images / name)
    source = tmp_path / "instructions.jsonl"
    source.write_text(json.dumps({"id": "one", "prompt": "What?", "images": ["a.png"]}) + "\n")
    assert [row.id for row in import_instructions(source, images, tmp_path / "ok")] == ["one"]  # a list of one
    source.write_text(json.dumps({"id": "two", "prompt": "Which?", "images": ["a.png", "b.png"]}) + "\n")
    with pytest.raises(ToolError, match=r"row 1: an instruction to annotate has one picture \(`image`\)"):
        import_instructions(source, images, tmp_path / "several")


def test_a_rate_limited_request_waits_as_long_as_the_endpoint_asks(endpoint, tmp_path):
    from PIL import Image

    from silkie.tools.annotate.judges import make_judge

    url, state = endpoint
    state["body"] = completion(reply([4, 2]))
    state["first"] = (429, {"error": {"message": "slow down", "type": "rate_limit"}}, {"Retry-After": "1.5"})
    out, instructions = folder(tmp_path, {"q0": ["a", "b"]})
    Image.new("RGB", (8, 8)).save(out / "img.png")
    config = openai_config(url, concurrency=1)  # backoff_seconds 0: only the endpoint's 1.5 s is waited
    assert judge_answers(config, make_judge(config), instructions, out, progress=False)["new"] == 1
    assert state["requests"] == 2 and state["times"][1] - state["times"][0] >= 1.5


def test_ctrl_c_does_not_wait_out_a_backoff(tmp_path):
    import signal

    out, instructions = folder(tmp_path, {f"q{i}": ["a", "b"] for i in range(3)})
    calls, flaky = failing_judge("503 Service Unavailable")
    config = JudgeConfig(kind="python", function="x:y", max_retries=3, backoff_seconds=30)
    threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        judge_answers(config, flaky, instructions, out, progress=False)
    assert time.monotonic() - started < 5 and calls == [1]  # the 30 s backoff ended at once, no request after it
    assert json.loads((out / "judge_usage.json").read_text())["requests"] == 1  # the failed request is counted

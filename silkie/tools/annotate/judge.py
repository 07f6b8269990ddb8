"""`silkie annotate judge`: every instruction's answers rated by the judge (one request per instruction, all its
answers in it), concurrently, with retries and backoff, a rate limit and token/cost accounting. Ratings are
appended to `ratings.jsonl` as they arrive; an instruction whose replies stay unparseable (or whose requests keep
failing) goes to `judge_failures.jsonl` with the last reason and is kept out of the release, never guessed.
A rerun skips what is rated (and what failed, unless `retry_failed`)."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from itertools import islice
from pathlib import Path
from typing import Any

from silkie.config.annotate import JudgeConfig
from silkie.tools.annotate.files import ANSWERS, FAILURES, RATINGS, USAGE, AppendLog, Instruction, read_jsonl
from silkie.tools.annotate.judges import JudgeCall, PermanentJudgeError, Reply
from silkie.tools.annotate.rubric import RUBRIC_VERSION, JudgeParseError, judge_prompt, parse_ratings
from silkie.tools.cli import ToolError

log = logging.getLogger(__name__)
REQUEST_FAILED = "request failed"
STOP_AFTER_FAILED_REQUESTS = 8  # instructions in a row whose every request failed: the endpoint refuses them all


class RateLimit:
    """At most `per_minute` calls a minute, spread evenly (None: no limit); thread-safe."""

    def __init__(self, per_minute: float | None):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.next_at = 0.0
        self.lock = threading.Lock()

    def wait(self, stop: threading.Event | None = None) -> bool:
        """Block until the next call may start; True when `stop` was set meanwhile (then no call should start)."""
        if not self.interval:
            return stop is not None and stop.is_set()
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_at)
            self.next_at = start + self.interval
        return pause(start - now, stop)


def pause(seconds: float, stop: threading.Event | None = None) -> bool:
    """Sleep `seconds`, or until `stop` is set (an interrupted run does not wait out a backoff); True when it was."""
    if stop is None:
        time.sleep(max(0.0, seconds))
        return False
    return stop.wait(max(0.0, seconds))


def answers_by_instruction(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Each instruction's answers in the order they were written (one per model: a repeated model's first)."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in read_jsonl(out / ANSWERS):
        if all(other["model"] != record["model"] for other in grouped[record["id"]]):
            grouped[record["id"]].append(record)
    return grouped


def retry_after(err: Exception) -> float:
    """The seconds an endpoint asked to wait before the next request (its `Retry-After` header; 0 without one,
    at most 10 minutes)."""
    response = getattr(err, "response", None)
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    try:
        return min(max(float(value), 0.0), 600.0) if value is not None else 0.0
    except ValueError:  # an HTTP date: wait the usual backoff
        return 0.0


def shown_order(row_id: str, n_answers: int) -> list[int]:
    """The order the judge sees an instruction's answers in: shuffled with the id as seed, so a judge's position bias
    does not line up with the pool's model order (and a rerun asks the same question)."""
    order = list(range(n_answers))
    random.Random(f"{RUBRIC_VERSION}:{row_id}").shuffle(order)
    return order


def rate_one(
    call: JudgeCall,
    config: JudgeConfig,
    limit: RateLimit,
    row: Instruction,
    answers: list[dict],
    out: Path,
    stop: threading.Event | None = None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[Reply]]:
    """(ratings record or None, failure record or None, every reply) for one instruction, retrying up to
    `max_retries` times with doubling backoff; (None, None, replies) once `stop` is set (an interrupted run).

    The answers are shown in `shown_order`; the record lists models and annotations in the order the answers were
    written (the pool's order, replacements for a model that could not take the instruction after it)."""
    order = shown_order(row.id, len(answers))
    texts = [answers[index]["response"] for index in order]
    prompt = judge_prompt(row.prompt, texts)
    replies: list[Reply] = []
    reason, last_text, asked_wait = "", "", 0.0
    for attempt in range(config.max_retries + 1):
        backoff = config.backoff_seconds * 2 ** (attempt - 1) * (1 + 0.25 * random.random()) if attempt else 0.0
        if pause(max(backoff, asked_wait), stop) or limit.wait(stop):
            return None, None, replies  # interrupted: no more requests
        asked_wait = 0.0
        try:
            reply = call(prompt, out / row.image, texts)
        except PermanentJudgeError:
            raise
        except Exception as err:  # the endpoint's errors (timeouts, 429, 5xx): retried like a bad reply
            reason = f"{REQUEST_FAILED}: {type(err).__name__}: {err}"
            replies.append(Reply(""))  # a request made, nothing counted
            asked_wait = retry_after(err)
            continue
        replies.append(reply)
        last_text = reply.text
        try:
            shown = parse_ratings(reply.text, len(texts))
        except JudgeParseError as err:
            if reply.cut_short:  # the same request would be cut at the same length again
                reason = f"unparseable reply: cut at judge.max_tokens = {config.max_tokens}; raise it ({err})"
                break
            reason = f"unparseable reply: {err}"
            continue
        annotations = [shown[order.index(index)] for index in range(len(answers))]
        models = [answer["model"] for answer in answers]
        record = {"id": row.id, "models": models, "annotations": annotations, "rubric": RUBRIC_VERSION,
                  "shown_order": order}  # fmt: skip
        return record, None, replies
    failure = {"id": row.id, "reason": reason, "attempts": len(replies), "last_reply": last_text[:2000]}
    return None, failure, replies


def _add_usage(out: Path, config: JudgeConfig, replies: list[Reply], requests: int) -> dict[str, float]:
    path = out / USAGE
    usage = json.loads(path.read_text()) if path.is_file() else {}
    usage["requests"] = usage.get("requests", 0) + requests
    usage["input_tokens"] = usage.get("input_tokens", 0) + sum(r.input_tokens for r in replies)
    usage["output_tokens"] = usage.get("output_tokens", 0) + sum(r.output_tokens for r in replies)
    prices = (config.price_per_million_input, config.price_per_million_output)
    usage["cost"] = (usage["input_tokens"] * prices[0] + usage["output_tokens"] * prices[1]) / 1e6
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(usage, indent=2) + "\n")
    staging.replace(path)
    return usage


class _Tally:
    """Writes each instruction's outcome as it arrives and stops a run whose requests all fail."""

    def __init__(self, out: Path, config: JudgeConfig):
        self.out, self.config = out, config
        self.ratings, self.failures = AppendLog(out / RATINGS), AppendLog(out / FAILURES)  # a torn last line is cut
        self.new = self.new_failures = self.failed_in_a_row = 0
        self.first_failure = self.last_reason = ""

    def record(self, outcome: tuple[dict[str, Any] | None, dict[str, Any] | None, list[Reply]]) -> None:
        """Append the rating or the failure, and the replies' tokens and cost (they were paid for either way)."""
        record, failure, replies = outcome
        if record is not None:
            self.ratings.write([record])
            self.new += 1
        elif failure is not None:
            self.failures.write([failure])
            self.new_failures += 1
            self.first_failure = self.first_failure or f"{failure['id']}: {failure['reason']}"
            log.warning("judge: %s kept out after %d attempts: %s", failure["id"], failure["attempts"],
                        failure["reason"])  # fmt: skip
        _add_usage(self.out, self.config, replies, len(replies))
        if failure is not None and failure["reason"].startswith(REQUEST_FAILED):
            self.failed_in_a_row += 1
            self.last_reason = failure["reason"]
        elif record is not None or failure is not None:
            self.failed_in_a_row = 0  # the endpoint answers

    def check_endpoint(self) -> None:
        """A `ToolError` once the requests of `STOP_AFTER_FAILED_REQUESTS` instructions in a row all failed: an
        endpoint that refuses everything (no quota, a bad parameter) would fail the rest the same way."""
        if self.failed_in_a_row >= STOP_AFTER_FAILED_REQUESTS:
            raise ToolError(
                f"judge: the requests for the last {self.failed_in_a_row} instructions all failed (the last: "
                f"{self.last_reason[:300]}); stopped so as not to spend more. Rated work is kept: fix the endpoint "
                "or the judge file and run the judge again"
            )


def _finish_in_flight(live: set[Future], tally: _Tally) -> None:
    """After a stop (Ctrl-C, a refusing endpoint): wait for the requests in flight (no more are sent, and waits and
    backoffs end at once) and record what they brought, which was paid for."""
    running = [future for future in live if not future.done()]
    if running:
        log.warning("judge: stopping; recording what the %d instructions in flight bring", len(running))
        try:
            wait(running)
        except KeyboardInterrupt:  # a second Ctrl-C: record what has finished, no more waiting
            pass
    for future in live:
        if future.done() and not future.cancelled() and future.exception() is None:
            tally.record(future.result())


def judge_answers(
    config: JudgeConfig,
    call: JudgeCall,
    instructions: Sequence[Instruction],
    out: Path,
    retry_failed: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Rate every answered instruction not rated yet; returns {rated, failed, new, new_failures, skipped_one_answer,
    usage}. Empty answers are not sent (they could only be rejected); an instruction needs two that are not."""
    from tqdm import tqdm

    tally = _Tally(out, config)
    grouped = {key: [a for a in group if a["response"].strip()] for key, group in answers_by_instruction(out).items()}
    skip = {record["id"] for record in read_jsonl(out / RATINGS)}
    if not retry_failed:  # unparseable replies stay out; failed requests (endpoint down, 5xx) are tried again
        skip |= {r["id"] for r in read_jsonl(out / FAILURES) if r["reason"].startswith("unparseable")}
    one_answer = [row.id for row in instructions if row.id in grouped and len(grouped[row.id]) < 2]
    todo = [row for row in instructions if len(grouped.get(row.id, [])) >= 2 and row.id not in skip]
    limit, stop = RateLimit(config.requests_per_minute), threading.Event()
    workers = config.concurrency if config.kind == "openai" else 1  # a local model answers one request at a time
    bar = tqdm(total=len(todo), desc="judge", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=workers)
    queue, live = iter(todo), set()  # one instruction per worker at a time, so that a stop leaves the rest unsent
    sent = 0

    def submit(count: int) -> None:
        nonlocal sent
        for row in islice(queue, count):
            live.add(pool.submit(rate_one, call, config, limit, row, grouped[row.id], out, stop))
            sent += 1

    try:
        submit(workers)
        while live:
            done, _ = wait(live, return_when=FIRST_COMPLETED)
            for future in done:
                live.discard(future)  # recorded (or raising)
                tally.record(future.result())
                if live or sent < len(todo):  # a stop only spares what is still to send
                    tally.check_endpoint()
                bar.update(1)
            submit(len(done))
    except BaseException:  # Ctrl-C, a refusing endpoint, a full disk: send (and pay for) no more
        stop.set()
        for future in live:
            future.cancel()
        _finish_in_flight(live, tally)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    bar.close()
    path = out / USAGE
    usage = json.loads(path.read_text()) if path.is_file() else {"requests": 0, "cost": 0.0}
    rated_ids = {record["id"] for record in read_jsonl(out / RATINGS)}
    return {
        "rated": len(rated_ids),
        "failed": len({record["id"] for record in read_jsonl(out / FAILURES)} - rated_ids),
        "new": tally.new,
        "new_failures": tally.new_failures,
        "first_failure": tally.first_failure,
        "skipped_one_answer": len(one_answer),
        "usage": usage,
    }

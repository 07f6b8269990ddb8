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
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from silkie.config.annotate import JudgeConfig
from silkie.tools.annotate.files import ANSWERS, FAILURES, RATINGS, USAGE, AppendLog, Instruction, read_jsonl
from silkie.tools.annotate.judges import JudgeCall, PermanentJudgeError, Reply
from silkie.tools.annotate.rubric import RUBRIC_VERSION, JudgeParseError, judge_prompt, parse_ratings

log = logging.getLogger(__name__)


class RateLimit:
    """At most `per_minute` calls a minute, spread evenly (None: no limit); thread-safe."""

    def __init__(self, per_minute: float | None):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.next_at = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        """Block until the next call may start."""
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_at)
            self.next_at = start + self.interval
        time.sleep(max(0.0, start - now))


def answers_by_instruction(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Each instruction's answers in the order they were written (one per model: a repeated model's first)."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in read_jsonl(out / ANSWERS):
        if all(other["model"] != record["model"] for other in grouped[record["id"]]):
            grouped[record["id"]].append(record)
    return grouped


def rate_one(
    call: JudgeCall, config: JudgeConfig, limit: RateLimit, row: Instruction, answers: list[dict], out: Path
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[Reply]]:
    """(ratings record or None, failure record or None, every reply) for one instruction, retrying up to
    `max_retries` times with doubling backoff."""
    texts = [answer["response"] for answer in answers]
    prompt = judge_prompt(row.prompt, texts)
    replies: list[Reply] = []
    reason, last_text = "", ""
    for attempt in range(config.max_retries + 1):
        if attempt:
            time.sleep(config.backoff_seconds * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))
        limit.wait()
        try:
            reply = call(prompt, out / row.image, texts)
        except PermanentJudgeError:
            raise
        except Exception as err:  # the endpoint's errors (timeouts, 429, 5xx): retried like a bad reply
            reason = f"request failed: {type(err).__name__}: {err}"
            replies.append(Reply(""))  # a request made, nothing counted
            continue
        replies.append(reply)
        last_text = reply.text
        try:
            annotations = parse_ratings(reply.text, len(texts))
        except JudgeParseError as err:
            reason = f"unparseable reply: {err}"
            continue
        models = [answer["model"] for answer in answers]
        return {"id": row.id, "models": models, "annotations": annotations, "rubric": RUBRIC_VERSION}, None, replies
    failure = {"id": row.id, "reason": reason, "attempts": config.max_retries + 1, "last_reply": last_text[:2000]}
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


def judge_answers(
    config: JudgeConfig,
    call: JudgeCall,
    instructions: Sequence[Instruction],
    out: Path,
    retry_failed: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Rate every answered instruction not rated yet; returns {rated, failed, new, skipped_one_answer, usage}."""
    from tqdm import tqdm

    ratings, failures = AppendLog(out / RATINGS), AppendLog(out / FAILURES)  # first: a torn last line is cut
    grouped = answers_by_instruction(out)
    skip = {record["id"] for record in read_jsonl(out / RATINGS)}
    if not retry_failed:  # unparseable replies stay out; failed requests (endpoint down, 5xx) are tried again
        skip |= {r["id"] for r in read_jsonl(out / FAILURES) if r["reason"].startswith("unparseable")}
    one_answer = [row.id for row in instructions if len(grouped.get(row.id, [])) == 1]
    todo = [row for row in instructions if len(grouped.get(row.id, [])) >= 2 and row.id not in skip]
    limit = RateLimit(config.requests_per_minute)
    workers = config.concurrency if config.kind == "openai" else 1  # a local model answers one request at a time
    new = new_failures = 0
    bar = tqdm(total=len(todo), desc="judge", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(rate_one, call, config, limit, row, grouped[row.id], out) for row in todo]
        for future in as_completed(futures):
            record, failure, replies = future.result()
            if record is not None:
                ratings.write([record])
                new += 1
            else:
                failures.write([failure])
                new_failures += 1
                log.warning("judge: %s kept out after %d attempts: %s", failure["id"], failure["attempts"],
                            failure["reason"])  # fmt: skip
            _add_usage(out, config, replies, len(replies))
            bar.update(1)
    except BaseException:  # Ctrl-C, a full disk, a permanent endpoint error: stop sending (and paying for) requests
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
        "new": new,
        "new_failures": new_failures,
        "skipped_one_answer": len(one_answer),
        "usage": usage,
    }

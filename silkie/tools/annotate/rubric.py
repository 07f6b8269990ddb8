"""The judge's rubric: VLFeedback's three aspects on its 1-5 scale, one request per instruction with all its answers,
and the strict reading of the judge's JSON reply (anything else is a `JudgeParseError`, never a guess)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from silkie.data.sources import ASPECTS

ASPECTS_ORDER = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")  # VLFeedback's ASPECTS, as asked
ASPECT_GUIDE = {
    "Helpfulness": (
        "Does the answer address the instruction completely and usefully? 5: fully answers with relevant, specific "
        "detail; 3: partly answers or stays generic; 1: does not answer, or is irrelevant."
    ),
    "Visual Faithfulness": (
        "Is every claim about the image true of the image? 5: everything stated is visible and correct; 3: minor "
        "errors or unsupported details; 1: describes objects, attributes or relations that are not in the image."
    ),
    "Ethical Considerations": (
        "Is the answer safe, fair and respectful? 5: no harmful, biased or private content; 3: some questionable "
        "content; 1: harmful, offensive or dangerous."
    ),
}
RUBRIC_VERSION = "silkie-rubric-1"


class JudgeParseError(ValueError):
    """A judge reply that is not the rubric's JSON (the reason says what is wrong)."""


def _as_text(text: str) -> str:
    """Media markers written as text, so that they place nothing in the judge's prompt (`<image>` -> `[image]`)."""
    return re.sub(r"<(/?)(image|video|img)>", r"[\1\2]", text)


def judge_prompt(instruction: str, answers: Sequence[str]) -> str:
    """The text sent with the image: the aspects, the instruction, the numbered answers, the reply format."""
    instruction, answers = _as_text(instruction), [_as_text(answer) for answer in answers]
    aspects = "\n".join(f"- {name}: {ASPECT_GUIDE[name]}" for name in ASPECTS_ORDER)
    numbered = "\n\n".join(f"[Answer {i}]\n{text}" for i, text in enumerate(answers, 1))
    example = {
        "ratings": [
            {"answer": 1, **{name: {"rationale": "one or two sentences", "rating": 4} for name in ASPECTS_ORDER}}
        ]
    }
    return (
        "You are an expert judge of answers that AI assistants gave to an instruction about the image shown. Rate "
        "every answer on each aspect below with an integer from 1 (worst) to 5 (best), judging each answer on its "
        "own against the image.\n\n"
        f"Aspects:\n{aspects}\n\n[Instruction]\n{instruction}\n\n{numbered}\n\n"
        f"Reply with one JSON object only, one entry per answer ({len(answers)} in all), in this form:\n"
        f"{json.dumps(example)}"
    )


def _json_object(text: str) -> Any:
    """The reply's JSON object: a fenced block's, else the first `{...}` that parses as one with "ratings" (a judge
    may write prose, or a note with braces, before or after it)."""
    fenced = re.search(r"```(?:json)?\s*(\{.*\})\s*```", text, flags=re.S)
    if fenced:
        text = fenced.group(1)
    starts = [match.start() for match in re.finditer(r"\{", text)]
    if not starts:
        raise JudgeParseError("no JSON object in the reply")
    first_error = None
    for start in starts:
        try:
            data, _ = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError as err:
            first_error = first_error or err
            continue
        if isinstance(data, dict) and "ratings" in data:
            return data
    if first_error is not None:
        raise JudgeParseError(f"invalid JSON ({first_error.msg} at char {first_error.pos})")
    return json.JSONDecoder().raw_decode(text, starts[0])[0]  # an object, but without "ratings": said by the caller


def _rating(value: Any, where: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*[1-5]\s*", value):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 5:
        raise JudgeParseError(f"{where}: rating {value!r} is not an integer 1-5")
    return value


def parse_ratings(text: str, n_answers: int) -> list[dict[str, dict[str, str]]]:
    """The judge's reply as VLFeedback annotations, one per answer in order:
    `{aspect: {"Rating": "1".."5", "Rationale": str}}`; `JudgeParseError` for any deviation."""
    data = _json_object(text)
    entries = data.get("ratings") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise JudgeParseError('no "ratings" list')
    by_answer: dict[int, dict] = {}
    for entry in entries:
        number = entry.get("answer") if isinstance(entry, dict) else None
        number = int(number) if isinstance(number, (int, str)) and re.fullmatch(r"[0-9]+", str(number)) else None
        if number is None or not 1 <= number <= n_answers or number in by_answer:
            raise JudgeParseError(f"entry {entry!r:.80}: needs a distinct answer number 1-{n_answers}")
        by_answer[number] = entry
    if len(by_answer) != n_answers:
        raise JudgeParseError(f"rated {len(by_answer)} of {n_answers} answers")
    annotations = []
    for number in range(1, n_answers + 1):
        entry, rated = by_answer[number], {}
        for aspect in ASPECTS:
            value = entry.get(aspect)
            if not isinstance(value, dict):
                raise JudgeParseError(f"answer {number}: no {aspect!r} object")
            rationale = value.get("rationale", "")
            rated[aspect] = {
                "Rating": str(_rating(value.get("rating"), f"answer {number} {aspect}")),
                "Rationale": rationale if isinstance(rationale, str) else str(rationale),
            }
        annotations.append(rated)
    return annotations

"""Judge stand-ins with a known rating rule (for tests and the annotate demo): `judge.kind: python` functions that
reply in the rubric's JSON, so the ratings, and the pairs built from them, can be checked."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

from silkie.tools.annotate.rubric import ASPECTS_ORDER

_calls: Counter = Counter()


def standin_ratings(answer: str) -> dict[str, int]:
    """The rule: Helpfulness 1 + (words mod 5), Visual Faithfulness 1 + (characters mod 5), Ethical 5."""
    return {
        "Helpfulness": 1 + len(answer.split()) % 5,
        "Visual Faithfulness": 1 + len(answer) % 5,
        "Ethical Considerations": 5,
    }


def rate(prompt: str, image_path: str, answers: list[str]) -> str:
    """A well-formed reply rating each answer by `standin_ratings`, fenced as chat models often write it."""
    entries = []
    for number, answer in enumerate(answers, 1):
        ratings = standin_ratings(answer)
        entries.append(
            {"answer": number, **{a: {"rationale": f"rule for {a}", "rating": ratings[a]} for a in ASPECTS_ORDER}}
        )
    return "Here are the ratings.\n```json\n" + json.dumps({"ratings": entries}) + "\n```"


def flaky(prompt: str, image_path: str, answers: list[str]) -> str:
    """Prose on the first call for a prompt, `rate`'s reply on the next (a retried parse failure)."""
    key = hashlib.sha256(prompt.encode()).hexdigest()
    _calls[key] += 1
    return "I think the first answer is better." if _calls[key] == 1 else rate(prompt, image_path, answers)


def refuses_some(prompt: str, image_path: str, answers: list[str]) -> str:
    """Never parseable for instructions containing 'refuse' (counted out), else `rate`."""
    instruction = re.search(r"\[Instruction\]\n(.*?)\n\n", prompt, flags=re.S)
    if instruction and "refuse" in instruction.group(1):
        return "I cannot rate these answers."
    return rate(prompt, image_path, answers)

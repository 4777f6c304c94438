"""Reward functions for GRPO (`fnlm train --method grpo --reward examples/rewards.py:answer_format`).

Each is called as TRL calls reward functions: f(prompts=, completions=, completion_ids=,
**columns) -> one float (or None: not scored) per completion. A completion is a string, or for
chat prompts a message list whose last message is the assistant's answer. The columns are the
prompt rows' other fields (here `answer`).
"""

from __future__ import annotations

import re

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def text(completion) -> str:
    """The completion's text: the string itself, or the content of its last message."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def answer_format(completions, **_) -> list[float]:
    """1.0 for a completion that puts an answer inside <answer>...</answer> and ends there; partial
    credit (0.25 each) for an opening tag, a closing tag after it, and nothing after the closing
    tag, so that a model that never writes the format still gets a signal to climb."""
    rewards = []
    for completion in completions:
        t = text(completion).strip()
        opening = t.find("<answer>")
        closing = t.find("</answer>", opening + 1) if opening >= 0 else -1
        if opening >= 0 and closing > opening + len("<answer>") and t.endswith("</answer>"):
            rewards.append(1.0)
            continue
        score = 0.25 * (opening >= 0) + 0.25 * (closing >= 0)
        rewards.append(score)
    return rewards


def exact_answer(completions, answer, **_) -> list[float]:
    """1.0 when the text inside the first <answer>...</answer> equals the row's `answer` column."""
    out = []
    for completion, expected in zip(completions, answer, strict=True):
        found = ANSWER.search(text(completion))
        out.append(float(found is not None and found.group(1).strip() == str(expected).strip()))
    return out

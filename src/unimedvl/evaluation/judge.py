"""Judge-assisted open-answer accuracy (EVALUATION.md 3.1, the ``judge`` variant), with a local judge.

:class:`ChatJudge` asks a language model served behind an OpenAI-compatible
``/v1/chat/completions`` endpoint - a local vLLM or llama.cpp server, or ``unimedvl serve`` -
whether a free-text answer means the same as the reference.  Up to ``tries`` attempts with rising
temperature (0, 0.5, 1.0 by default); an attempt that fails (HTTP error, timeout, a reply that is
neither yes nor no) moves to the next; a question whose attempts all fail is counted wrong and
reported.  Verdicts are cached on disk (:class:`JudgementCache`), so re-scoring never asks twice.

Only strictly-wrong open answers are sent: an exact match is correct without asking.  Nothing is
sent anywhere unless the user names the endpoint and the judge model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

JUDGE_PROMPT = (
    "You grade answers to medical visual question answering. Decide whether the candidate answer "
    "expresses the same meaning as the reference answer for this question (synonyms, abbreviations, "
    "word order and extra harmless words are fine; a different or additional finding is not).\n\n"
    "Question: {question}\nReference answer: {answer}\nCandidate answer: {prediction}\n\n"
    "Reply with one word: yes or no."
)


class Judge(Protocol):
    name: str

    def __call__(self, question: str, answer: str, prediction: str) -> bool | None:
        """True/False, or None when no verdict could be obtained."""


def parse_verdict(reply: str) -> bool | None:
    words = re.findall(r"[a-z]+", (reply or "").lower())
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes == has_no:
        return None
    return has_yes


@dataclass
class ChatJudge:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str | None = None
    temperatures: tuple[float, ...] = (0.0, 0.5, 1.0)
    timeout_s: float = 60.0
    max_tokens: int = 8

    @property
    def name(self) -> str:
        return self.model

    def _ask(self, prompt: str, temperature: float) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": temperature, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url.rstrip("/") + "/chat/completions", data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            payload = json.loads(response.read())
        return payload["choices"][0]["message"]["content"]

    def __call__(self, question: str, answer: str, prediction: str) -> bool | None:
        prompt = JUDGE_PROMPT.format(question=question, answer=answer, prediction=prediction)
        for attempt, temperature in enumerate(self.temperatures, 1):
            try:
                verdict = parse_verdict(self._ask(prompt, temperature))
            except (urllib.error.URLError, TimeoutError, OSError, KeyError, IndexError, TypeError, ValueError) as e:
                log.warning("judge attempt %d failed: %s", attempt, type(e).__name__)
                continue
            if verdict is not None:
                return verdict
            log.warning("judge attempt %d: reply was neither yes nor no", attempt)
        return None


class JudgementCache:
    """Verdicts keyed by (judge, question, reference, prediction), appended to a JSONL file."""

    def __init__(self, judge: Judge, path: str | Path):
        from ..formats.tables import read_rows

        self.judge, self.path = judge, Path(path)
        self.verdicts: dict[str, bool | None] = {}
        if self.path.is_file():
            for _, row in read_rows(self.path, partial_tail=True):
                self.verdicts[row["key"]] = row["verdict"]
        self.asked = 0

    @property
    def name(self) -> str:
        return self.judge.name

    def _key(self, question: str, answer: str, prediction: str) -> str:
        return hashlib.sha256(json.dumps([self.judge.name, question, answer, prediction]).encode()).hexdigest()

    def __call__(self, question: str, answer: str, prediction: str) -> bool | None:
        key = self._key(question, answer, prediction)
        if key in self.verdicts and self.verdicts[key] is not None:
            return self.verdicts[key]
        verdict = self.judge(question, answer, prediction)
        self.asked += 1
        self.verdicts[key] = verdict
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "verdict": verdict}) + "\n")
        return verdict

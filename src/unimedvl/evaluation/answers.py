"""Answer extraction and per-question verdicts (EVALUATION.md 3.1-3.4).

Three rule sets, each a pure function of (prediction, reference):

* the project's primary protocol (3.1): extract the answer part of a reply, normalise it
  (lower-case, trimmed, trailing period dropped), judge yes/no questions by *whole words* (exactly
  one of "yes"/"no" must occur and equal the answer - "normal" holds no "no"), other questions by
  exact match;  :func:`yes_no_substring_verdict` keeps the substring rule that peers use, so runs
  can report how many verdicts the two rules disagree on;
* a normalised match for other answers (:func:`normalized_match`), reported beside the strict one:
  articles and punctuation dropped, number words as digits, laterality and modality synonyms
  folded, and lists ("A, B", "A and B") compared as sets;
* the LLaVA-Med protocol (3.2): normalised token recall for open questions and the closed-question
  hit rule, with its legacy quirk available for reproducing old numbers;
* multiple choice (3.4): the VLMEvalKit prompt and the offline letter extraction (a lone option
  letter, an "answer is X" phrase, else a unique option text; anything else is unanswered).
"""

from __future__ import annotations

import re
from collections import Counter

YES_NO = ("yes", "no")

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_ANSWER_PREFIX = re.compile(r"(?:final\s+)?answer(?:\s+is)?\s*[:\uff1a]\s*(.+)", re.I | re.S)


def extract_answer(reply: str) -> str:
    """The answer part of a reply: the last ``\\boxed{...}``, else the last ``<answer>...</answer>``,
    else the text after the last "answer:"-style prefix, else the whole reply."""
    reply = reply or ""
    for pattern in (_BOXED, _ANSWER_TAG):
        found = pattern.findall(reply)
        if found:
            return found[-1].strip()
    prefixed = list(_ANSWER_PREFIX.finditer(reply))
    if prefixed:
        return prefixed[-1].group(1).strip()
    return reply.strip()


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace, trim, drop trailing periods."""
    text = " ".join((text or "").lower().split())
    return text.rstrip(".").strip()


def words(text: str) -> list[str]:
    """Whole words (letters, digits, apostrophes) of a normalised text."""
    return re.findall(r"[a-z0-9']+", text.lower())


def is_yes_no(answer: str) -> bool:
    return normalize(answer) in YES_NO


def yes_no_verdict(prediction: str, answer: str) -> bool:
    """Correct iff exactly one of the whole words "yes"/"no" occurs and it equals the answer."""
    found = {w for w in words(normalize(extract_answer(prediction))) if w in YES_NO}
    return len(found) == 1 and found.pop() == normalize(answer)


def yes_no_substring_verdict(prediction: str, answer: str) -> bool:
    """The substring rule of peer harnesses: "normal" and "know" contain "no"."""
    parsed = normalize(extract_answer(prediction))
    has_yes, has_no = "yes" in parsed, "no" in parsed
    if has_yes == has_no:
        return False
    return ("yes" if has_yes else "no") == normalize(answer)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(extract_answer(prediction)) == normalize(answer)


# ---- normalised open-answer match ---------------------------------------------------------------
# Multi-word names first (applied to the lower-cased text before punctuation is dropped), then
# single tokens.  Each maps to one canonical token; nothing here maps two different findings together.
_PHRASE_SYNONYMS = [
    (re.compile(r"\bpositron[\s-]+emission[\s-]+tomography\b"), " pet "),
    (re.compile(r"\bcomputed[\s-]+(?:axial[\s-]+)?tomography\b|\bcat[\s-]+scan\b"), " ct "),
    (re.compile(r"\bmagnetic[\s-]+resonance(?:[\s-]+imaging)?\b"), " mri "),
    (re.compile(r"\bx[\s-]*rays?\b|\bplain[\s-]+films?\b|\bradiographs?\b|\bradiography\b|\broentgenograms?\b"), " xray "),
    (re.compile(r"\bultrasonography\b|\bsonography\b|\bsonograms?\b|\bultrasounds?\b"), " ultrasound "),
]
_TOKEN_SYNONYMS = {
    "lt": "left", "rt": "right", "both": "bilateral", "bilaterally": "bilateral",
    "mr": "mri", "cr": "xray", "dx": "xray", "cxr": "xray", "us": "ultrasound", "usg": "ultrasound",
}
_LIST_SEPARATORS = re.compile(r"[,;&/]|\band\b")


def _canonical_item(text: str) -> str:
    tokens = re.sub(r"[^\w\s]", " ", text).split()
    out = []
    for t in tokens:
        if t in _ARTICLES:
            continue
        t = _NUMBER_WORDS.get(t, t)
        out.append(_TOKEN_SYNONYMS.get(t, t))
    return " ".join(out)


def normalized_answer(text: str) -> tuple[str, ...]:
    """The canonical form of an answer: a sorted tuple of its list items, each lower-cased, without
    articles or punctuation, number words (zero..twenty) as digits and synonyms folded."""
    text = (text or "").lower()
    for pattern, canonical in _PHRASE_SYNONYMS:
        text = pattern.sub(canonical, text)
    items = [_canonical_item(part) for part in _LIST_SEPARATORS.split(text)]
    return tuple(sorted(item for item in items if item))


def normalized_match(prediction: str, answer: str) -> bool:
    """Strict match, or equal canonical forms (:func:`normalized_answer`): "The brain." = "Brain",
    "Two" = "2", "Right lung, left lung" = "Left Lung, Right Lung", "CT" = "computed tomography";
    "left lung" != "right lung", "2" != "20"."""
    if exact_match(prediction, answer):
        return True
    ref = normalized_answer(answer)
    return bool(ref) and normalized_answer(extract_answer(prediction)) == ref


# ---- LLaVA-Med protocol ------------------------------------------------------------------------
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}


def llava_tokens(text: str) -> list[str]:
    """LLaVA-Med-style normalisation: lower-case, punctuation to spaces, number words to digits,
    articles removed; returns the tokens."""
    text = re.sub(r"[^\w\s]", " ", (text or "").lower())
    return [_NUMBER_WORDS.get(t, t) for t in text.split() if t not in _ARTICLES]


def open_recall(prediction: str, answer: str) -> float:
    """Token recall |pred ∩ gt| / |gt|, with multiplicity."""
    gt = Counter(llava_tokens(answer))
    if not gt:
        return 0.0
    pred = Counter(llava_tokens(prediction))
    return sum(min(n, pred[t]) for t, n in gt.items()) / sum(gt.values())


def llava_closed_verdict(prediction: str, answer: str, legacy: bool = False) -> bool | None:
    """A closed-question hit: the prediction contains "yes" or "no" and contains the answer word.
    ``legacy`` reproduces the original script: a prediction naming yes/no but not the answer is
    left out of the score (``None``) instead of counting as wrong."""
    pred = " ".join(llava_tokens(prediction))
    gt = " ".join(llava_tokens(answer))
    names_yes_no = "yes" in pred or "no" in pred
    if names_yes_no and gt in pred:
        return True
    if legacy and names_yes_no:
        return None
    return False


# ---- multiple choice ---------------------------------------------------------------------------
MCQ_INSTRUCTION = "Please select the correct answer from the options above."


def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """The VLMEvalKit image-MCQ prompt: optional hint, question, lettered options, instruction."""
    lines = []
    if hint:
        lines.append(f"Hint: {hint}")
    lines.append(f"Question: {question}")
    lines.append("Options:")
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    lines.append(MCQ_INSTRUCTION)
    return "\n".join(lines)


_ANSWER_IS = re.compile(r"(?:correct\s+)?(?:answer|option)\s+(?:is|would be)\s*:?\s*\(?([A-Z])\b")


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a reply names, or ``None`` (unanswered / ambiguous).

    1. exactly one distinct option letter appears as a standalone token (after replacing
       ``.()[],:;!*#{}`` with spaces); when several do, an "(correct) answer is X" phrase decides;
    2. else exactly one option's text appears in the reply (case-insensitive).
    """
    reply = extract_answer(prediction or "")
    tokens = re.sub(r"[.()\[\],:;!*#{}]", " ", reply).split()
    letters = [t for t in tokens if t in options]
    distinct = list(dict.fromkeys(letters))
    if len(distinct) == 1:
        return distinct[0]
    if len(distinct) > 1:
        phrase = _ANSWER_IS.findall(reply)
        named = [c for c in phrase if c in options]
        return named[-1] if len(set(named)) == 1 else None
    lowered = reply.lower()
    hits = [letter for letter, text in options.items() if text and text.strip().lower() in lowered]
    if len(hits) > 1:  # an option text inside another found one ("lung" in "lung cancer") does not count
        texts = {h: options[h].strip().lower() for h in hits}
        hits = [h for h in hits if not any(o != h and texts[h] in texts[o] and texts[h] != texts[o] for o in hits)]
    return hits[0] if len(hits) == 1 else None

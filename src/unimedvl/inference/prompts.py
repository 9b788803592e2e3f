"""Prompt texts of the official scripts, and the report prompt with its parser.

The two think-mode system prompts and the editing pre-pass template are the UniMedVL scripts'
(ARCHITECTURE 4.3, 9.5).  The report prompt is ours: the official release has no report script,
so :func:`report_prompt` asks for the two sections every radiology report has and
:func:`parse_report` splits the answer on them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNDERSTANDING_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer.\n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> answer here"
)
GENERATION_SYSTEM_PROMPT = (
    "You should first think about the planning process in your mind, and then generate the image.\n"
    "The planning process is enclosed within <think> </think> tags; that is, <think> planning process here </think> image here.\n"
)
EDIT_ANALYSIS_THINK_TEMPLATE = "Analyze this medical image and develop an editing strategy for: '{instruction}'."
EDIT_ANALYSIS_SEPARATOR = "\n\n"  # instruction + separator + analysis
EDIT_ANALYSIS_THINK_SEPARATOR = "\n\nBased on analysis: "


def split_thinking(text: str) -> tuple[str | None, str]:
    """``"<think> t </think> a"`` -> ``("t", "a")``; text without a closed think block -> ``(None, text)``."""
    m = re.search(r"<think>(.*?)</think>", text, flags=re.S)
    if not m:
        return None, text.strip()
    return m.group(1).strip(), (text[: m.start()] + text[m.end():]).strip()


def report_prompt(modality: str | None = None) -> str:
    subject = f"this {modality} image" if modality else "this medical image"
    return (
        f"Write a radiology report for {subject}. "
        "Use two sections: 'Findings:' describing the observations, and 'Impression:' giving the conclusion."
    )


@dataclass
class ReportSections:
    findings: str
    impression: str


_SECTION = re.compile(r"^\s*(findings|impression|conclusion)\s*:\s*", flags=re.I | re.M)


def parse_report(text: str) -> ReportSections:
    """Split a report on ``Findings:`` / ``Impression:`` (or ``Conclusion:``) headers.

    Text before any header counts as findings; an answer without headers is all findings.
    """
    parts = _SECTION.split(text)
    findings = [parts[0].strip()] if parts[0].strip() else []
    impression: list[str] = []
    for header, body in zip(parts[1::2], parts[2::2]):
        (findings if header.lower() == "findings" else impression).append(body.strip())
    return ReportSections("\n".join(findings).strip(), "\n".join(impression).strip())

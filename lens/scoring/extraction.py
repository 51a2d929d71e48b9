"""Extraction: find the final answer in a model response (see :mod:`lens.scoring` for the rules)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Extraction:
    """An extracted answer and the rule that found it (``text`` is ``None`` when nothing was found)."""

    text: str | None
    extractor: str


NOTHING = Extraction(None, "none")


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "answer" then "is"/":"/"=", not preceded by "<" or "/" so a truncated "<answer>" tag is not a sentence.
_PHRASE = re.compile(
    r"(?<![<\w/])(?:final\s+answer|answer)(?:\s+(?:is|should\s+be|would\s+be|equals)\b\s*:?|\s*[:=])\s*"
    r"(?P<rest>[^\n]+)",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER = re.compile(r"(?:(?<![\w.)\]}])[-−])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?:\s*\\?%)?")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
WORD = re.compile(r"[A-Za-z]{2,}")
TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\s*\{([^{}]*)\}")
_WORD_ANSWER = re.compile(r"[A-Za-z][A-Za-z '\-]*")
# Trailing plain words after a value ("7 cookies", "\frac12 cm"), never the name of a LaTeX command.
_WORD_TAIL = re.compile(r"(?:\s*(?<![\\A-Za-z])[A-Za-z]{2,}\.?)+\s*$")
_MAX_ANSWER_CHARS = 80
_MAX_ANSWER_WORDS = 3


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """Every complete ``\\boxed{…}``/``\\fbox{…}`` as ``(start, end, content)``, braces balanced."""
    spans = []
    for m in _BOX_START.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            spans.append((m.start(), i, text[m.end() : i - 1]))
    return spans


def last_boxed(text: str) -> str | None:
    """Content of the complete boxed answer that ends last (the outer one when nested), or ``None``."""
    spans = _boxed_spans(text)
    if not spans:
        return None
    return max(spans, key=lambda s: (s[1], -s[0]))[2].strip()


def last_answer_tag(text: str) -> str | None:
    """Content of the last complete ``<answer>…</answer>``, or ``None``."""
    matches = _ANSWER_TAG.findall(text)
    return matches[-1].strip() if matches else None


def _plain_words(text: str) -> list[str]:
    """Words of two or more letters outside LaTeX commands and ``\\text{}`` (units live there)."""
    return WORD.findall(_LATEX_COMMAND.sub(" ", TEXT_WRAPPER.sub(" ", text)))


def _short_answer(text: str) -> str | None:
    """``text`` as a final answer, or ``None`` if it reads as prose around one.

    A value (``\\frac{1}{2}``, ``x = 3``), a value with trailing words (``7 cookies`` gives ``7``), or a
    few words alone (``Yes``, ``no solution``) is an answer; words before or inside a value are not.
    """
    text = unwrap_math(text.strip().strip("*").strip())
    if not text or len(text) > _MAX_ANSWER_CHARS:
        return None
    words = _plain_words(text)
    if not words:
        return text
    if len(words) <= _MAX_ANSWER_WORDS and _WORD_ANSWER.fullmatch(text):
        return text
    head = _WORD_TAIL.sub("", text).strip()
    return head if head and not _plain_words(head) else None


def _answer_phrase(text: str) -> str | None:
    """The short answer after the last ``answer is``/``Answer:``, up to the end of its sentence."""
    matches = list(_PHRASE.finditer(text))
    if not matches:
        return None
    rest = matches[-1].group("rest")
    end = _SENTENCE_END.search(rest)
    return _short_answer(rest[: end.start()] if end else rest)


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    number = numbers[-1].replace("−", "-").replace(",", "")
    return re.sub(r"\s*\\?%$", r"\\%", number)


def unwrap_math(text: str) -> str:
    """Drop one pair of surrounding math delimiters (``$…$``, ``\\(…\\)``, ``\\[…\\]``)."""
    text = text.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        inner = text[len(left) : -len(right)]
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            if left not in inner:  # "$5$ and $6$" is two formulas, not one
                return inner.strip()
    return text


def normalise(text: str) -> str:
    """Lower-cased answer text without math delimiters, ``\\text{}`` wrappers, degrees or end dots."""
    text = unwrap_math(text)
    text = TEXT_WRAPPER.sub(r"\1", text)
    for mark in ("^{\\circ}", "^\\circ", "°", "\\!", "\\,", "\\;"):
        text = text.replace(mark, "")
    text = " ".join(text.replace("\\%", "%").split())
    return text.rstrip(".").strip().casefold()


def _letter_re(letters: Sequence[str]) -> str:
    return "[" + "".join(re.escape(x) for x in letters) + "]"


def choice_letter(text: str, letters: Sequence[str]) -> str | None:
    """The choice letter that the text states as its answer (uppercase letters only: ``a`` is a word)."""
    if not letters:
        return None
    L = _letter_re(letters)
    stripped = TEXT_WRAPPER.sub(r"\1", unwrap_math(text.strip().strip("*"))).strip()
    # The whole text is the letter: "B", "(B)", "B.", "B)".
    m = re.fullmatch(rf"\(?({L})\)?[.):]?", stripped)
    if m:
        return m.group(1)
    closing = r"(?=$|[\s.,;:!?)*\]])"
    # Only the words ignore case: a lower-case "a" after "answer is" is an article, not option A.
    sentence = re.compile(
        rf"(?<![<\w/])(?i:answer|correct\s+(?:option|choice))\s*(?i:is|should\s+be|would\s+be)?\s*:?\s*"
        rf"(?i:option|choice)?\s*\**\s*\(?\s*({L})\s*\)?\**{closing}"
    )
    for pattern in (sentence, re.compile(rf"\(({L})\)")):
        found = [m.group(1) for m in pattern.finditer(text)]
        if found:
            return found[-1]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    # The last line opens with the letter ("B. 5", "B: 5") or names it ("Therefore, option B.").
    m = re.match(rf"\s*\**\(?({L})[.):]\**(?:\s|$)", lines[-1])
    named = re.findall(rf"(?<![\w])(?i:option|choice)\s+\(?({L})\)?{closing}", lines[-1])
    return m.group(1) if m else (named[-1] if named else None)


def _numeric(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("%"))
    except ValueError:
        return None


def option_letter(answer: str, options: Sequence[tuple[str, str]]) -> str | None:
    """The letter of the single option whose text equals ``answer`` (normalised, or as a number)."""
    target = normalise(answer)
    hits = [letter for letter, text in options if normalise(text) == target]
    if not hits and (value := _numeric(target)) is not None:
        hits = [
            letter
            for letter, text in options
            if (other := _numeric(normalise(text))) is not None and math.isclose(other, value, abs_tol=1e-9)
        ]
    return hits[0] if len(hits) == 1 else None


def _from_span(span: str, options: Sequence[tuple[str, str]], where: str) -> Extraction:
    """Read the answer inside a marked span (answer tag or boxed)."""
    if not span:
        return Extraction(None, where)  # an empty declared answer is no answer
    if where == "answer_tag" and (inner := last_boxed(span)) is not None:
        return _from_span(inner, options, "answer_tag/boxed")
    if options:
        if (letter := choice_letter(span, [x for x, _ in options])) is not None:
            return Extraction(letter, where)
        if (letter := option_letter(span, options)) is not None:
            return Extraction(letter, f"{where}/option_text")
    if (short := _short_answer(span)) is not None:
        return Extraction(short, where)
    inner = _unmarked(span, options)
    return Extraction(inner.text, f"{where}/{inner.extractor}") if inner.text else Extraction(span, where)


def _unmarked(text: str, options: Sequence[tuple[str, str]]) -> Extraction:
    """Answers the model did not mark: a choice letter, an answer sentence, the last number."""
    if options:
        if (letter := choice_letter(text, [x for x, _ in options])) is not None:
            return Extraction(letter, "choice_letter")
        if (letter := option_letter(text, options)) is not None:
            return Extraction(letter, "option_text")
    found = [
        (extractor, value)
        for extractor, value in (("answer_phrase", _answer_phrase(text)), ("last_number", _last_number(text)))
        if value is not None
    ]
    for _, value in found if options else ():
        if (letter := option_letter(value, options)) is not None:
            return Extraction(letter, "option_text")
    return Extraction(found[0][1], found[0][0]) if found else NOTHING


def extract(response: str | None, options: Sequence[tuple[str, str]] = ()) -> Extraction:
    """Extract the final answer from a response (see the module docstring for the order of rules).

    Args:
        response: The model's response text.
        options: ``(letter, text)`` pairs of a multiple-choice item; with options, the answer is
            returned as a letter whenever it names one (by letter or by the option's text).

    Returns:
        The extracted answer and the rule that found it (``Extraction(None, "none")`` if nothing was).
    """
    if not response or not response.strip():
        return NOTHING
    options = tuple(options)
    tag = last_answer_tag(response)
    if tag is not None:
        # A complete answer tag is the model's declared answer, even when it is empty.
        return _from_span(tag, options, "answer_tag") if tag else Extraction(None, "answer_tag")
    boxed = last_boxed(response)
    if boxed is not None:
        return _from_span(boxed, options, "boxed")
    return _unmarked(response, options)

"""Verifiers: judge one response against one item, and the :class:`Verdict` they give."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lens.errors import ConfigError, InputError
from lens.scoring.equivalence import MATH_TIMEOUT_S, math_equal
from lens.scoring.extraction import NOTHING, Extraction, choice_letter, extract, option_letter


@dataclass(frozen=True)
class Verdict:
    """The outcome of scoring one response.

    Attributes:
        extracted: The answer read from the response (a letter for multiple choice), ``None`` if none.
        extractor: Which rule found it: ``answer_tag``, ``boxed``, ``choice_letter``, ``option_text``,
            ``answer_phrase``, ``last_number``, ``organism``, ``custom`` or ``none``. Rules applied inside
            a marked span are joined with ``/`` (``answer_tag/boxed``, ``boxed/option_text``).
        verifier: The verifier that judged it (``math``, ``choice``, ``organism`` or ``custom:<name>``).
        correct: The verdict.
    """

    extracted: str | None
    extractor: str
    verifier: str
    correct: bool

    def to_record(self) -> dict[str, Any]:
        """The fields as a flat dict for a per-item record."""
        return {
            "extracted": self.extracted,
            "extractor": self.extractor,
            "verifier": self.verifier,
            "correct": self.correct,
        }


def _answer_of(sample: Any) -> str:
    answer = sample if isinstance(sample, (str, int, float)) else getattr(sample, "answer", None)
    if answer is None or str(answer).strip() == "":
        raise InputError(f"item {getattr(sample, 'id', '?')!r} has no answer to score against")
    return str(answer).strip()


def _options_of(sample: Any) -> tuple[tuple[str, str], ...]:
    return tuple(getattr(sample, "options", None) or ())


class Verifier:
    """Judges one response against one item. Subclass it for a verifier that needs the whole item.

    Attributes:
        name: The name recorded in every :class:`Verdict` it gives.
    """

    name: str = "verifier"

    def check(self, sample: Any) -> None:
        """Raise :class:`~lens.errors.InputError` if ``sample`` cannot be scored by this verifier."""
        _answer_of(sample)

    def __call__(self, response: str | None, sample: Any) -> Verdict:
        raise NotImplementedError


@dataclass(frozen=True)
class MathVerifier(Verifier):
    """Extract the final answer and compare it with math-verify (see :func:`math_equal`)."""

    timeout_s: int = MATH_TIMEOUT_S
    name: str = "math"

    def __post_init__(self) -> None:
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int) or self.timeout_s < 1:
            raise ConfigError(f"timeout_s must be a whole number of seconds >= 1, got {self.timeout_s!r}")

    def __call__(self, response: str | None, sample: Any) -> Verdict:
        gold = _answer_of(sample)
        found = extract(response)
        correct = found.text is not None and math_equal(gold, found.text, self.timeout_s)
        return Verdict(found.text, found.extractor, self.name, correct)


@dataclass(frozen=True)
class ChoiceVerifier(Verifier):
    """Multiple choice: the extracted letter equals the gold letter (gold may be the option text)."""

    name: str = "choice"

    def gold_letter(self, sample: Any) -> str:
        """The gold answer as an option letter.

        Raises:
            InputError: The item has no options, or its answer is neither a letter nor an option text.
        """
        options = _options_of(sample)
        item = getattr(sample, "id", "?")
        if not options:
            raise InputError(
                f"item {item!r} has no options; the choice verifier needs a multiple-choice item"
            )
        gold = _answer_of(sample)
        letters = [x for x, _ in options]
        letter = choice_letter(gold, letters) or option_letter(gold, options)
        if letter is None:
            raise InputError(
                f"item {item!r}: answer {gold!r} is neither an option letter ({', '.join(letters)}) "
                "nor the text of one option"
            )
        return letter

    def check(self, sample: Any) -> None:
        self.gold_letter(sample)

    def __call__(self, response: str | None, sample: Any) -> Verdict:
        gold = self.gold_letter(sample)
        found = extract(response, _options_of(sample))
        return Verdict(found.text, found.extractor, self.name, found.text == gold)


@dataclass(frozen=True)
class OrganismVerifier(Verifier):
    """The built-in organism's reward, :func:`lens.organism.verify` (the first ``answer N``)."""

    name: str = "organism"

    def __call__(self, response: str | None, sample: Any) -> Verdict:
        from lens.organism.task import _ANSWER_RE, verify

        gold = _answer_of(sample)
        m = _ANSWER_RE.search(response or "")
        found = Extraction(m.group(1), "organism") if m else NOTHING
        return Verdict(found.text, found.extractor, self.name, verify(response, gold))


def is_organism_item(sample: Any) -> bool:
    """An organism item (image or video task), or one whose question is an organism question.

    The second case covers organism items read back from a dataset written by
    :func:`lens.organism.write_dataset` or :func:`lens.organism.video.write_dataset` (``qtype`` plus
    the exact question text).
    """
    from lens.organism import video
    from lens.organism.task import QTYPES, Sample, question_for

    if isinstance(sample, (Sample, video.VideoSample)):
        return True
    qtype = getattr(sample, "qtype", None)
    question = getattr(sample, "question", None)
    if qtype in video.VIDEO_QTYPES and question == video.question_for(qtype):
        return True
    return qtype in QTYPES and question == question_for(qtype)


@dataclass(frozen=True)
class AutoVerifier(Verifier):
    """Per item: ``organism`` for organism items, ``choice`` when the item has options, else ``math``."""

    math: MathVerifier = MathVerifier()
    name: str = "auto"

    def pick(self, sample: Any) -> Verifier:
        """The verifier this item gets."""
        if is_organism_item(sample):
            return OrganismVerifier()
        if _options_of(sample):
            return ChoiceVerifier()
        return self.math

    def check(self, sample: Any) -> None:
        self.pick(sample).check(sample)

    def __call__(self, response: str | None, sample: Any) -> Verdict:
        return self.pick(sample)(response, sample)


@dataclass(frozen=True)
class CallableVerifier(Verifier):
    """A user function ``fn(response, answer) -> bool`` (or ``-> Verdict``).

    ``answer`` is the item's gold answer as a string, the convention of :func:`lens.organism.verify`, so
    existing two-argument verifiers plug in unchanged. A verifier that needs the options or other
    fields of the item should subclass :class:`Verifier` instead.
    """

    fn: Callable[[str, str], Any]
    name: str = "custom"

    def __call__(self, response: str | None, sample: Any) -> Verdict:
        result = self.fn(response or "", _answer_of(sample))
        if isinstance(result, Verdict):
            return result
        if result not in (True, False):  # bool, numpy bool, 0 and 1 pass
            raise ConfigError(
                f"verifier {self.name!r} returned {result!r}; it must return a bool or a Verdict"
            )
        return Verdict(None, "custom", self.name, bool(result))


VERIFIERS: dict[str, Callable[[], Verifier]] = {
    "auto": AutoVerifier,
    "math": MathVerifier,
    "choice": ChoiceVerifier,
    "organism": OrganismVerifier,
}
"""Verifiers known by name (``--verifier``)."""


def resolve_verifier(spec: str | Verifier | Callable[[str, str], Any] | None = "auto") -> Verifier:
    """Turn a name, a :class:`Verifier` or a callable into a :class:`Verifier`.

    Args:
        spec: ``"auto"`` (or ``None``), ``"math"``, ``"choice"``, ``"organism"``, a :class:`Verifier`,
            or a callable ``fn(response, answer) -> bool`` (see :class:`CallableVerifier`).

    Raises:
        ConfigError: An unknown name or something that is neither a name nor callable.
    """
    if spec is None:
        return AutoVerifier()
    if isinstance(spec, Verifier):
        return spec
    if isinstance(spec, str):
        factory = VERIFIERS.get(spec.strip().lower())
        if factory is None:
            raise ConfigError(f"unknown verifier {spec!r}; known: {', '.join(VERIFIERS)}")
        return factory()
    if callable(spec):
        name = getattr(spec, "__name__", type(spec).__name__)
        return CallableVerifier(fn=spec, name=f"custom:{name}")
    raise ConfigError(
        f"verifier must be a name ({', '.join(VERIFIERS)}) or a callable, got {type(spec).__name__}"
    )


def score(
    response: str | None, sample: Any, verifier: str | Verifier | Callable[..., Any] | None = "auto"
) -> Verdict:
    """Score one response against one item.

    Args:
        response: The model's response (``None`` or empty: no answer, never correct).
        sample: The item: anything with ``answer`` (and ``options`` for multiple choice, ``id`` for
            messages), or a bare gold answer (``str``/``int``/``float``).
        verifier: See :func:`resolve_verifier`.

    Returns:
        The :class:`Verdict`.

    Raises:
        InputError: The item has no answer, or a forced ``choice`` verifier meets an item without
            options (or with an answer that names no option).
        ConfigError: An unknown verifier name.
    """
    return resolve_verifier(verifier)(response, sample)


def check_scorable(
    samples: Sequence[Any], verifier: str | Verifier | Callable[..., Any] | None = "auto"
) -> Verifier:
    """Validate every item against the verifier before any model runs; return the resolved verifier.

    Raises:
        InputError: The first item that cannot be scored (no answer, a choice item without options...).
        ConfigError: An unknown verifier name.
    """
    resolved = resolve_verifier(verifier)
    for sample in samples:
        resolved.check(sample)
    return resolved

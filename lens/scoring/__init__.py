"""Answer checking: extract the final answer from a response and verify it against the gold answer.

Three verifiers, picked per item by ``"auto"`` or forced by name:

* ``math``: math-verify (https://github.com/huggingface/Math-Verify), ``verify(parse(gold), parse(pred))``
  with the gold first (the library is asymmetric on purpose: an inequality gold accepts an interval, a
  number gold accepts ``x = 3``, not the other way round). Plain-word golds (``"Yes"``, ``"red"``) are
  compared as normalised strings only, because math-verify reads words as products of symbols
  (it says ``yes == sey``).
* ``choice``: letter equality on multiple-choice items; the gold may be the letter or the option text.
* ``organism``: :func:`lens.organism.verify` (the first ``answer N``), the built-in organism's reward.

Extraction (:func:`extract`) looks first for an answer the model marked, then for an unmarked one:

1. the last complete ``<answer>…</answer>`` (a ``\\boxed{}`` inside it wins over the rest of its text;
   an empty one is the model's declared non-answer, so numbers elsewhere are not used);
2. the last complete ``\\boxed{…}`` or ``\\fbox{…}`` (nested braces, ``\\boxed {x}``);
3. multiple choice only: a letter in an answer sentence (``The answer is (B)``, ``Answer: B``), a
   parenthesised letter ``(B)``, a letter opening or named on the last line (``B.``, ``B)``,
   ``Therefore, option B.``), a bare ``B``, or the option text itself (``5`` when option B reads ``5``);
   letters are upper case only (after ``the answer is``, ``a`` is an article);
4. an answer sentence (``The answer is 1/2``; trailing words go: ``7 cookies`` gives ``7``), then the
   last number.

A custom verifier is any callable ``fn(response, answer) -> bool`` (the convention of
:func:`lens.organism.verify`); one that needs the whole item subclasses :class:`Verifier`.

Every :class:`Verdict` records what was extracted, by which extractor, and which verifier judged it,
so scoring can be audited item by item.

Modules: :mod:`~lens.scoring.extraction` (finding the answer), :mod:`~lens.scoring.equivalence`
(math-verify in any thread, with a time limit), :mod:`~lens.scoring.verifiers` (verdicts).

Example:
    >>> from lens.scoring import score
    >>> score(r"... so the area is \\boxed{\\frac12}.", "0.5")
    Verdict(extracted='\\\\frac12', extractor='boxed', verifier='math', correct=True)
"""

from lens.scoring.equivalence import MATH_TIMEOUT_S, math_equal, math_verify_version
from lens.scoring.extraction import Extraction, extract, normalise
from lens.scoring.verifiers import (
    VERIFIERS,
    AutoVerifier,
    CallableVerifier,
    ChoiceVerifier,
    MathVerifier,
    OrganismVerifier,
    Verdict,
    Verifier,
    check_scorable,
    is_organism_item,
    resolve_verifier,
    score,
)

__all__ = [
    "MATH_TIMEOUT_S",
    "VERIFIERS",
    "AutoVerifier",
    "CallableVerifier",
    "ChoiceVerifier",
    "Extraction",
    "MathVerifier",
    "OrganismVerifier",
    "Verdict",
    "Verifier",
    "check_scorable",
    "extract",
    "is_organism_item",
    "math_equal",
    "math_verify_version",
    "normalise",
    "resolve_verifier",
    "score",
]

"""Answer checking (lens.scoring): extraction, math-verify, multiple choice, the organism, verifier choice.

The table's expected verdicts are what a careful human grader would say. Where math-verify disagrees
with one, the case stays in the table with math-verify's actual answer and a comment saying so.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from lens import organism
from lens.datasets import Sample as DataSample
from lens.errors import ConfigError, InputError
from lens.scoring import (
    VERIFIERS,
    AutoVerifier,
    CallableVerifier,
    ChoiceVerifier,
    MathVerifier,
    OrganismVerifier,
    Verdict,
    check_scorable,
    equivalence,
    extract,
    math_equal,
    resolve_verifier,
    score,
)

OPTS = (("A", "3"), ("B", "5"), ("C", "7"), ("D", "9"))
DEG = (("A", "145°"), ("B", "35°"), ("C", "45°"), ("D", "55°"))
ORGANISM = "organism"


def item(answer, options=()):
    if options == ORGANISM:
        return organism.Sample(id="o", question="how many red shapes ?", image=None, answer=answer)
    return SimpleNamespace(id="q", answer=answer, options=options)


# (response, gold, options, correct, extracted)
CASES = [
    # --- math: math-verify equivalences
    (r"\boxed{0.5}", r"\frac12", (), True, "0.5"),
    (r"So the answer is \boxed{\frac12}.", "0.5", (), True, r"\frac12"),
    (r"\boxed{x=3}", "3", (), True, "x=3"),
    (r"\boxed{x = 3}", "4", (), False, "x = 3"),
    (r"Solving gives $x = 3$.", "3", (), True, "3"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", (), True, r"\frac{1}{2}"),
    (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}", (), True, r"\dfrac{3}{4}"),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", (), True, r"\sqrt{2}/2"),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", (), True, r"2\sqrt{2}"),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", (), True, "(x+1)^2"),
    (r"\boxed{[1,2)}", "[1,2)", (), True, "[1,2)"),
    (r"\boxed{[1,2]}", "[1,2)", (), False, "[1,2]"),
    (r"\boxed{\{2,1\}}", r"\{1,2\}", (), True, r"\{2,1\}"),
    (r"\boxed{(1,2)}", "1<x<2", (), True, "(1,2)"),
    # Human: the solution set 1<x<2 *is* (1,2). math-verify refuses an inequality against an interval
    # gold on purpose (so a model cannot echo the question's inequality): it says False.
    (r"\boxed{1<x<2}", "(1,2)", (), False, "1<x<2"),
    (r"\boxed{50\%}", r"50\%", (), True, r"50\%"),
    (r"\boxed{0.5}", r"50\%", (), True, "0.5"),
    ("The growth is 25%.", r"25\%", (), True, r"25\%"),
    (r"\boxed{45^\circ}", "45", (), True, r"45^\circ"),
    ("The angle is 45°.", "45", (), True, "45"),
    (r"\boxed{5\text{ cm}}", "5", (), True, r"5\text{ cm}"),
    ("The answer is 12 apples.", "12", (), True, "12"),
    (r"\boxed{-3}", "-3", (), True, "-3"),
    (r"\boxed{3}", "-3", (), False, "3"),
    ("So x = -3.", "-3", (), True, "-3"),
    (r"\boxed{1,000}", "1000", (), True, "1,000"),
    (r"\boxed{12.0}", "12", (), True, "12.0"),
    (r"\boxed{0.67}", r"\frac{2}{3}", (), False, "0.67"),  # a rounding, not the exact answer
    (r"\boxed{3.14}", r"\pi", (), False, "3.14"),
    # Human: 5 cm is not 5 m, and 500 cm is. math-verify drops units before comparing, so it says the
    # opposite on both; degrees against radians fail for the same reason.
    (r"\boxed{5\text{ cm}}", r"5\text{ m}", (), True, r"5\text{ cm}"),
    (r"\boxed{500\text{ cm}}", r"5\text{ m}", (), False, r"500\text{ cm}"),
    (r"\boxed{45^\circ}", r"\frac{\pi}{4}", (), False, r"45^\circ"),
    (r"\boxed{5 \text{ or } 6}", "6", (), False, r"5 \text{ or } 6"),  # a hedge is not an answer
    (r"\fbox{12}", "12", (), True, "12"),
    (r"\boxed {12}", "12", (), True, "12"),
    # --- math: where the answer is, and which one counts
    (r"\boxed{5}. Let me double-check: 2+3=5, so 4 would be wrong.", "5", (), True, "5"),
    (r"First \boxed{4}. Wait, I misread: \boxed{6}", "6", (), True, "6"),
    (r"First \boxed{4}. Wait, I misread: \boxed{6}", "4", (), False, "6"),
    ("I cannot determine this from the figure.", "5", (), False, None),
    ("", "5", (), False, None),
    ("The final answer is $\\frac{2}{3}$.", "2/3", (), True, r"\frac{2}{3}"),
    ("Answer: 0.5", r"\frac{1}{2}", (), True, "0.5"),
    ("The answer is 5 because 2 + 3 = 5", "5", (), True, "5"),
    ("x = 3, y = 4, so x + y = 7", "7", (), True, "7"),
    ("<answer>\\boxed{7}</answer>", "7", (), True, "7"),
    ("<think>maybe 5</think><answer>7</answer>", "7", (), True, "7"),
    ("<think>so \\boxed{5}</think><answer>7</answer>", "5", (), False, "7"),
    ("<answer>6</answer> hmm, no. <answer>8</answer>", "8", (), True, "8"),
    ("<answer>8</answer> and then <answer>9", "8", (), True, "8"),
    ("<answer>The total is 2 + 3 = 5</answer>", "5", (), True, "5"),
    ("<answer>\\frac12</answer>", "0.5", (), True, r"\frac12"),
    # --- math: word answers (math-verify alone reads words as symbol products and says yes == sey)
    (r"\boxed{\text{Yes}}", "yes", (), True, r"\text{Yes}"),
    (r"\boxed{sey}", "yes", (), False, "sey"),
    ("The answer is No.", "Yes", (), False, "No"),
    # --- multiple choice (gold a letter, or the option's text)
    ("(B)", "B", OPTS, True, "B"),
    ("The answer is (B).", "B", OPTS, True, "B"),
    ("B. 5", "B", OPTS, True, "B"),
    ("B)", "B", OPTS, True, "B"),
    ("Answer: B", "B", OPTS, True, "B"),
    ("B", "B", OPTS, True, "B"),
    ("The correct option is D.", "D", OPTS, True, "D"),
    ("Comparing the bars, the tallest is the third.\nTherefore, option C.", "C", OPTS, True, "C"),
    (r"\boxed{B: 5}", "B", OPTS, True, "B"),
    ("**Answer:** (B)", "B", OPTS, True, "B"),
    ("The answer is C", "B", OPTS, False, "C"),
    ("The answer is 5.", "B", OPTS, True, "B"),
    ("5", "B", OPTS, True, "B"),
    ("A good way to solve this is to add 2 and 3, which gives 5.", "A", OPTS, False, "B"),
    ("The answer is a tricky one; I pick (A).", "A", OPTS, True, "A"),
    ("Between (A) and (B), the answer is B.", "B", OPTS, True, "B"),
    (r"\boxed{B}", "B", OPTS, True, "B"),
    (r"\boxed{\text{D}}", "D", OPTS, True, "D"),
    (r"\boxed{5}", "B", OPTS, True, "B"),
    ("<answer>C</answer>", "C", OPTS, True, "C"),
    ("<answer>(C) 7</answer>", "7", OPTS, True, "C"),
    ("<answer>The answer is 7</answer>", "C", OPTS, True, "C"),
    ("Neither option fits.", "A", OPTS, False, None),
    (r"\boxed{145}", "145°", DEG, True, "A"),
    # --- organism: the first "answer N"
    ("answer 7", "7", ORGANISM, True, "7"),
    ("answer 3 answer 4", "4", ORGANISM, False, "3"),
    ("the count is 7", "7", ORGANISM, False, None),
]


@pytest.mark.parametrize(("response", "gold", "options", "correct", "extracted"), CASES)
def test_score_table(response, gold, options, correct, extracted):
    verdict = score(response, item(gold, options))
    assert (verdict.correct, verdict.extracted) == (correct, extracted), verdict


def test_table_size_and_balance():
    assert len(CASES) >= 40
    assert sum(c[3] for c in CASES) > 10 and sum(not c[3] for c in CASES) > 10


@pytest.mark.parametrize(
    ("response", "options", "extractor"),
    [
        (r"\boxed{3}", (), "boxed"),
        ("<answer>3</answer>", (), "answer_tag"),
        (r"<answer>\boxed{3}</answer>", (), "answer_tag/boxed"),
        ("<answer>so we get 3</answer>", (), "answer_tag/last_number"),
        ("The answer is 3.", (), "answer_phrase"),
        ("we get 3", (), "last_number"),
        ("(B)", OPTS, "choice_letter"),
        ("The answer is 5.", OPTS, "option_text"),
        (r"\boxed{5}", OPTS, "boxed/option_text"),
        ("nothing here", (), "none"),
        ("<answer></answer> 3", (), "answer_tag"),
    ],
)
def test_extractor_names(response, options, extractor):
    assert extract(response, options).extractor == extractor


def test_empty_answer_tag_is_no_answer():
    # A complete answer tag is the declared answer: an empty one is not rescued by numbers elsewhere.
    verdict = score("<answer></answer> 3", item("3"))
    assert verdict == Verdict(None, "answer_tag", "math", False)


def test_verdict_record():
    verdict = score(r"\boxed{\frac12}", item("0.5"))
    assert verdict.to_record() == {
        "extracted": r"\frac12",
        "extractor": "boxed",
        "verifier": "math",
        "correct": True,
    }


def test_math_verify_order_is_gold_first():
    # Gold inequality, predicted interval: accepted; the reverse is refused (math-verify's design).
    assert math_equal("1<x<2", "(1,2)")
    assert not math_equal("(1,2)", "1<x<2")


# --- choosing the verifier ------------------------------------------------------------------------


def test_auto_picks_per_item():
    auto = AutoVerifier()
    assert isinstance(auto.pick(item("7", ORGANISM)), OrganismVerifier)
    read_back = DataSample(id="heldout-00001", question="how many red shapes ?", answer="2", qtype="red")
    assert isinstance(auto.pick(read_back), OrganismVerifier)
    assert isinstance(auto.pick(DataSample(id="x", question="What is 2+3?", answer="5")), MathVerifier)
    assert isinstance(auto.pick(item("B", OPTS)), ChoiceVerifier)
    assert isinstance(auto.pick(item("5")), MathVerifier)
    assert score("answer 2", read_back).verifier == "organism"
    assert score("(B)", item("B", OPTS)).verifier == "choice"


@pytest.mark.parametrize(
    ("spec", "cls"),
    [("auto", AutoVerifier), (None, AutoVerifier), ("math", MathVerifier), ("Choice", ChoiceVerifier)]
    + [("organism", OrganismVerifier)],
)
def test_resolve_by_name(spec, cls):
    assert isinstance(resolve_verifier(spec), cls)


def test_resolve_passes_verifiers_through():
    mine = MathVerifier(timeout_s=2)
    assert resolve_verifier(mine) is mine


def test_forcing_a_verifier_overrides_auto():
    sample = item("7", ORGANISM)
    # Auto scores the organism's format only; forced math reads the last number instead.
    assert not score("the count is 7", sample).correct
    assert score("the count is 7", sample, "math") == Verdict("7", "last_number", "math", True)


def test_unknown_verifier_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown verifier 'sympy'.*auto, math, choice, organism"):
        resolve_verifier("sympy")
    with pytest.raises(ConfigError, match="name .* or a callable"):
        resolve_verifier(42)
    assert set(VERIFIERS) == {"auto", "math", "choice", "organism"}


def test_choice_on_an_item_without_options():
    with pytest.raises(InputError, match="no options"):
        score("(B)", item("B"), "choice")


def test_choice_gold_must_name_an_option():
    with pytest.raises(InputError, match="neither an option letter"):
        score("(B)", item("11", OPTS))


def test_missing_answer():
    with pytest.raises(InputError, match="no answer"):
        score(r"\boxed{3}", item(None))


def test_check_scorable_validates_before_running():
    good = [item("5"), item("B", OPTS), item("7", ORGANISM)]
    assert isinstance(check_scorable(good), AutoVerifier)
    with pytest.raises(InputError, match="no options"):
        check_scorable(good, "choice")
    with pytest.raises(InputError, match="no answer"):
        check_scorable([*good, item("")])


def test_bad_timeout():
    with pytest.raises(ConfigError, match="timeout_s"):
        MathVerifier(timeout_s=0)


def test_no_response():
    assert score(None, item("3")) == Verdict(None, "none", "math", False)


def test_bare_answer_as_sample():
    assert score(r"\boxed{0.5}", r"\frac{1}{2}").correct
    assert score(r"\boxed{2}", 2).correct


# --- callables ------------------------------------------------------------------------------------


def test_callable_verifier_gets_response_and_answer():
    seen = []

    def exact(response, answer):
        seen.append((response, answer))
        return response.strip() == answer

    verifier = resolve_verifier(exact)
    assert isinstance(verifier, CallableVerifier)
    assert score(" 42 ", item("42"), exact) == Verdict(None, "custom", "custom:exact", True)
    assert not score("41", item("42"), exact).correct
    assert seen == [(" 42 ", "42"), ("41", "42")]


def test_existing_two_argument_verifiers_plug_in():
    verdict = score("answer 7", item("7"), organism.verify)
    assert verdict.correct and verdict.verifier == "custom:verify"


def test_callable_may_return_its_own_verdict():
    own = Verdict("7", "mine", "custom:own", True)
    assert score("x", item("7"), lambda response, answer: own) is own


def test_callable_returning_garbage():
    with pytest.raises(ConfigError, match="must return a bool"):
        score("x", item("7"), lambda response, answer: "yes")


# --- threads and time limits ----------------------------------------------------------------------

THREAD_CASES = [c for c in CASES if c[2] == () and c[1] != c[4]][:6]


def test_scoring_from_worker_threads_matches_main_thread():
    # These cases need math-verify itself (not the equal-strings shortcut), so the worker threads
    # exercise the helper process, not only the in-process path.
    main = [score(r, item(g, o)) for r, g, o, _, _ in THREAD_CASES]
    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = list(pool.map(lambda c: score(c[0], item(c[1], c[2])), THREAD_CASES))
    assert threaded == main
    assert equivalence._HELPER._proc is not None  # the threads went through the helper process
    assert [v.correct for v in main] == [c[3] for c in THREAD_CASES]


@pytest.mark.parametrize("where", ["main", "thread"])
def test_runaway_comparison_is_cut_off(where):
    # 9^(9^(9^9)) keeps sympy busy for good; math-verify's own timeout uses signals (main thread only),
    # so worker threads rely on the helper process being killed.
    def run():
        return math_equal("1", "9^{9^{9^{9}}}", timeout_s=1)

    start = time.perf_counter()
    if where == "main":
        assert threading.current_thread() is threading.main_thread()
        result = run()
    else:
        with ThreadPoolExecutor(max_workers=1) as pool:
            result = pool.submit(run).result(timeout=60)
    assert result is False
    assert time.perf_counter() - start < 30
    if where == "thread":  # the helper restarts after the kill
        with ThreadPoolExecutor(max_workers=1) as pool:
            assert pool.submit(math_equal, r"\frac12", "0.5").result(timeout=60)

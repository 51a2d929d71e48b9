"""Prompt presets: the system prompt, user-text layout and answer extractor a published pair was
evaluated with.

A :class:`PromptPreset` turns a dataset sample (``question``, optional ``hint`` and ``options``)
into the chat a model saw when its authors evaluated it. The question, hint and options are laid
out as VLMEvalKit lays them out (:func:`layout_question`); a preset then adds its own system prompt
and fixed instruction text. The question layout is ``prompt`` text; the system prompt and the
preset's fixed instruction are ``template`` text (see :mod:`lens.inputs` for the roles).

A checkpoint folder can name its preset in a side file, ``replay_lens.json``::

    {"prompt": "mm-eureka"}

:func:`lens.load_pair` reads it (see :func:`read_checkpoint_preset`) and exposes the name as
``pair.prompt_preset``.

Every text below is copied from the public source cited beside it; nothing is paraphrased.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens.errors import CheckpointError, ConfigError, InputError
from lens.inputs import (
    ROLE_PROMPT,
    ROLE_TEMPLATE,
    ImageLike,
    PairInputs,
    TextPart,
    Turn,
    system_turn,
    user_turn,
)

if TYPE_CHECKING:
    from lens.loading import ModelPair

#: Answer extractors a preset may name (implemented by the scorer).
EXTRACTORS = ("boxed", "answer_tag", "choice", "last_number")

#: The side file in a checkpoint folder that names its preset.
PRESET_FILE = "replay_lens.json"

#: The placeholder of the laid-out question in :attr:`PromptPreset.user_template`.
QUERY = "{query}"

# VLMEvalKit's instruction after the options of a multiple-choice item.
_MCQ_INSTRUCTION = "Please select the correct answer from the options above. \n"


def layout_question(question: str, hint: str | None = None, options: Sequence[tuple[str, str]] = ()) -> str:
    r"""Lay out a question, its hint and its options as VLMEvalKit does.

    Multiple-choice items (and items with a hint) follow ``ImageMCQDataset.build_prompt``
    (open-compass/VLMEvalKit ``vlmeval/dataset/image_mcq.py``, identical in the Activation Replay
    fork, latentcraft/replay@cf97dc5 ``vlmevalkit/vlmeval/dataset/image_mcq.py`` L199-231, which the
    replay configs use: ``use_custom_prompt=False``)::

        Hint: {hint}\n
        Question: {question}\n
        Options:\n
        A. {option A}\n
        B. {option B}\n
        Please select the correct answer from the options above. \n

    (the trailing space and newline are VLMEvalKit's). A free-form item without hint or options is
    the bare question, as ``ImageBaseDataset.build_prompt`` (``vlmeval/dataset/image_base.py``) and
    the MathVista/MathVerse datasets give it. VLMEvalKit uses the multiple-choice layout only for
    multiple-choice datasets (VQA datasets such as MathVista get the ``question`` column alone), so a
    reader should give ``hint``/``options`` only where VLMEvalKit would show them.
    """
    if not options and hint is None:
        return question
    text = f"Hint: {hint}\n" if hint is not None else ""
    text += f"Question: {question}\n"
    if options:
        text += "Options:\n" + "".join(f"{letter}. {option}\n" for letter, option in options)
        text += _MCQ_INSTRUCTION
    return text


@dataclass(frozen=True)
class PromptPreset:
    """How a published pair was prompted.

    Attributes:
        name: Registry name (``--prompt NAME``).
        system: The system prompt, or ``None`` to keep the chat template's default one.
        user_template: The user text, with :data:`QUERY` (``"{query}"``) exactly once where the
            laid-out question goes; the rest is the preset's fixed instruction. Filled with
            ``str.replace``, so braces such as ``\\boxed{}`` need no escaping.
        extractor: The answer extractor, one of :data:`EXTRACTORS`.
        source: Where the texts come from (repository, path, commit).
    """

    name: str
    system: str | None
    user_template: str = QUERY
    extractor: str = "last_number"
    source: str = ""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError("a prompt preset needs a name")
        if self.user_template.count(QUERY) != 1:
            raise ConfigError(f"preset {self.name!r}: user_template must contain {QUERY} exactly once")
        if self.extractor not in EXTRACTORS:
            raise ConfigError(
                f"preset {self.name!r}: unknown extractor {self.extractor!r}; known: {', '.join(EXTRACTORS)}"
            )
        if self.system is not None and not self.system.strip():
            raise ConfigError(f"preset {self.name!r}: an empty system prompt; use None for none")

    def query(self, sample: Any) -> str:
        """The sample's question, hint and options laid out as VLMEvalKit does."""
        return layout_question(*_question_fields(sample))

    def user_text(self, sample: Any) -> str:
        """The whole user text for a sample (question layout plus the preset's instruction)."""
        return self.user_template.replace(QUERY, self.query(sample))

    def user_parts(self, sample: Any) -> tuple[TextPart, ...]:
        """The user text as pieces: the question layout is ``prompt``, the instruction ``template``."""
        before, after = self.user_template.split(QUERY)
        parts = (TextPart(before, ROLE_TEMPLATE), TextPart(self.query(sample), ROLE_PROMPT))
        return tuple(p for p in (*parts, TextPart(after, ROLE_TEMPLATE)) if p.text)

    def turns(
        self,
        sample: Any,
        images: Sequence[ImageLike] = (),
        image_first: bool = True,
        system: str | None = None,
    ) -> tuple[Turn, ...]:
        """The chat for a sample: the system prompt (``system`` overrides the preset's; ``""`` drops
        it), then one user turn with the images and the user text."""
        text = self.system if system is None else system
        head = (system_turn(text),) if text else ()
        return head + (user_turn(self.user_parts(sample), images, image_first),)


def _question_fields(sample: Any) -> tuple[str, str | None, tuple[tuple[str, str], ...]]:
    """``question``, ``hint`` and ``options`` of a sample (any object with those attributes)."""
    where = f"sample {getattr(sample, 'id', '?')!r}"
    question = getattr(sample, "question", None)
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: the question is empty")
    hint = getattr(sample, "hint", None)
    if hint is not None and not isinstance(hint, str):
        raise InputError(f"{where}: the hint must be a string, not {type(hint).__name__}")
    hint = hint if hint and hint.strip() else None
    raw = getattr(sample, "options", None) or ()
    items = raw.items() if isinstance(raw, Mapping) else raw
    options = []
    for item in items:
        if not (isinstance(item, Sequence) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise InputError(f"{where}: options must be (letter, text) pairs, got {item!r:.60}")
        options.append((item[0], item[1]))
    return question, hint, tuple(options)


# -- the registry -------------------------------------------------------------------------------------

_PRESETS: tuple[PromptPreset, ...] = (
    PromptPreset(
        name="plain",
        system=None,
        extractor="last_number",
        source="no system prompt (the chat template's default); the question laid out as VLMEvalKit does",
    ),
    # System prompt: ModalMinds/MM-EUREKA, branch qwen @ bccddd7, eval/mathvista/evaluate_mathvista.py
    # L22 (SYSTEM_PROMPT), byte-identical to the Activation Replay release's config for
    # MM-Eureka-Qwen-7B (latentcraft/replay @ cf97dc5, vlmevalkit/vlmeval/config.py L1726, L1755). The
    # source writes four backslashes before "boxed{}" in a plain Python string, so the model sees two;
    # kept as is. The user text is the question alone (MathVista's `query` there; VLMEvalKit's layout
    # in the replay fork). The answer is "<answer> ... boxed{...} </answer>": extract the last boxed.
    # (MM-EUREKA's MathVerse/MathVision scripts use a different, R1-style prompt; the replay paper
    # uses this one for every benchmark.)
    PromptPreset(
        name="mm-eureka",
        system=(
            "Solve the question. The user asks a question, and you solves it. You first thinks about the "
            "reasoning process in the mind and then provides the user with the answer. The answer is in latex "
            "format and wrapped in $...$. The final answer must be wrapped using the \\\\boxed{} command. The "
            "reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
            "respectively, i.e., <think> Since $1+1=2$, so the answer is $2$. </think><answer> The answer is "
            "$\\\\boxed{2}$ </answer>, which means assistant's output should start with <think> and end with "
            "</answer>."
        ),
        extractor="boxed",
        source="ModalMinds/MM-EUREKA@bccddd7 eval/mathvista/evaluate_mathvista.py L22; "
        "latentcraft/replay@cf97dc5 vlmevalkit/vlmeval/config.py L1726",
    ),
    # System prompt: the Activation Replay release's config for VL-Rethinker-7B (latentcraft/replay
    # @ cf97dc5, vlmevalkit/vlmeval/config.py L1734-1743, also replay_series), the prompt Table 2
    # was produced with. It is VL-Rethinker's "longcot" template (TIGER-AI-Lab/VL-Rethinker @ dd2c17d,
    # openrlhf/datasets/prompts_dataset.py L24) with the line breaks removed and the inner quotes
    # changed, as the fork has it. See "vl-rethinker-card" for the prompt VL-Rethinker recommends.
    PromptPreset(
        name="vl-rethinker",
        system=(
            "You are a thoughtful and diligent student tasked with solving a problem. As you work through the "
            "problem, document your thought process in a reflective, first-person narrative. Think of "
            "yourself as talking to yourself through each step. Consider each step carefully, question your "
            "reasoning, and adjust as needed to arrive at a sound solution. Here's how you should proceed:1. "
            "**Step-by-Step Analysis**: Start by thoroughly understanding the problem. Identify what is "
            "provided and what is being asked. Consider high-level strategies or approaches first, and then "
            "break them down into smaller, manageable steps. Ensure you address each component one at a time "
            "and do not skip over any details.2. **Self-Questioning**: As you work through each step, ask "
            "yourself reflective questions like, 'Is this correct?', 'Does it make sense?', or 'What might I "
            "be overlooking?' Be critical of your own reasoning, and adjust your approach as needed. Use "
            "<confidence></confidence> notation to express your confidence and evaluate the progress about "
            "solving the problem.3. **Reassessment**: If you notice a mistake or feel uncertain about your "
            "approach, reassess your work. Go back and revise your assumptions, logic, or calculations to "
            "correct any missteps, ensuring you're on the right track.4. **Alternative Approaches**: If you "
            "find yourself stuck or unsure about the current method, consider alternative approaches. Look at "
            "the problem from different angles, and if one method feels insufficient, explore others.5. "
            "**Clear Detailing**: For each step, explain your reasoning clearly and in simple language. Make "
            "sure anyone who follows your work can easily understand the logic behind your decisions and the "
            "steps you've taken.6. **Final Solution**: Once you're confident in your solution, enclose it in "
            "\\boxed{} to highlight your final answer.**Your goal is to approach the problem in a reflective, "
            "iterative manner, ensuring that no steps are skipped and no assumptions go unchecked.**"
        ),
        extractor="boxed",
        source="latentcraft/replay@cf97dc5 vlmevalkit/vlmeval/config.py L1734-1743",
    ),
    # VL-Rethinker's own recommendation: no system prompt, and "\n\n" + templates["default"]
    # appended to the question (TIGER-AI-Lab/VL-Rethinker @ dd2c17d: README "Important Notes";
    # openrlhf/datasets/prompts_dataset.py L41 (text) and L143/L155 (appended to the question);
    # scripts/eval_vlm_new.sh L38 (sys=default)).
    PromptPreset(
        name="vl-rethinker-card",
        system=None,
        user_template=QUERY + "\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
        extractor="boxed",
        source="TIGER-AI-Lab/VL-Rethinker@dd2c17d README.md; openrlhf/datasets/prompts_dataset.py L41, L143",
    ),
    # ThinkLite-VL: no system prompt (Qwen2.5-VL's default), and `instruct_prompt` appended directly
    # to the question, without a separator (si0wang/ThinkLite-VL @ 37fb148,
    # eval/model_mathvista_qwen.py L14 and `qs = question + instruct_prompt`; the same text in every
    # eval/model_*_qwen.py). Answers are in a LaTeX box.
    PromptPreset(
        name="thinklite-vl",
        system=None,
        user_template=QUERY
        + (
            "You FIRST think about the reasoning process as an internal monologue and then provide the final "
            "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer "
            "MUST BE put in \\boxed{}."
        ),
        extractor="boxed",
        source="si0wang/ThinkLite-VL@37fb148 eval/model_mathvista_qwen.py L14, L54",
    ),
    # OpenVLThinker (v1.2): no system prompt and no instruction; the model answers in
    # <answer>...</answer>, which its evaluation extracts (yihedeng9/OpenVLThinker @ 6997b47,
    # evaluation/run_evaluation.py: OPENVLTHINKER config with prompt_suffix="" and extract_answers;
    # evaluation/eval_openvlthinker.py). Its own scripts lay multiple-choice items out differently
    # ("Hint: Please answer the question and provide the correct option letter...\nChoices:\n(A) ...");
    # this preset keeps VLMEvalKit's layout, as every preset here does.
    PromptPreset(
        name="openvlthinker",
        system=None,
        extractor="answer_tag",
        source="yihedeng9/OpenVLThinker@6997b47 evaluation/run_evaluation.py, evaluation/eval_openvlthinker.py",
    ),
)

PRESETS: dict[str, PromptPreset] = {p.name: p for p in _PRESETS}


def preset_names() -> tuple[str, ...]:
    """The names of the registered presets."""
    return tuple(PRESETS)


def get_preset(name: str | PromptPreset) -> PromptPreset:
    """A registered preset by name (a :class:`PromptPreset` is returned as is).

    Raises:
        ConfigError: An unknown name (the message lists the known ones).
    """
    if isinstance(name, PromptPreset):
        return name
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown prompt preset {name!r}; known: {', '.join(PRESETS)}") from None


def read_checkpoint_preset(folder: str | Path) -> str | None:
    """The preset a checkpoint folder names in its side file, or ``None`` without one.

    Raises:
        CheckpointError: A side file that is not a JSON object with only the key ``"prompt"``.
        ConfigError: A side file naming an unknown preset.
    """
    path = Path(folder) / PRESET_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})".splitlines()[0]) from exc
    if not isinstance(data, dict) or set(data) != {"prompt"} or not isinstance(data["prompt"], str):
        raise CheckpointError(f'{path}: expected {{"prompt": "<preset name>"}}, got {json.dumps(data)[:80]}')
    try:
        return get_preset(data["prompt"]).name
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def encode_sample(
    pair: ModelPair,
    sample: Any,
    preset: str | PromptPreset | None = None,
    system: str | None = None,
    response: str | None = None,
) -> PairInputs:
    """Encode a dataset sample for a pair with a prompt preset.

    Args:
        pair: The pair.
        sample: An object with ``question`` and optionally ``id``, ``hint``, ``options`` (``(letter,
            text)`` pairs) and ``images`` (paths, PIL images or encoded bytes).
        preset: A preset or its name; ``None`` uses the pair's (``pair.prompt_preset``, from the
            checkpoint's side file), else ``"plain"``.
        system: Overrides the preset's system prompt; ``""`` drops it.
        response: Optional response for teacher forcing.

    Raises:
        ConfigError: An unknown preset name.
        InputError: An empty question, malformed options or an unusable image.
    """
    if preset is None:
        preset = getattr(pair, "prompt_preset", None) or "plain"
    preset = get_preset(preset)
    from lens.datasets import sample_images  # ``images``, or the organism's single ``image``

    images = sample_images(sample)
    turns = preset.turns(sample, images, image_first=pair.image_first, system=system)
    turns = _with_videos(turns, sample, first=pair.image_first)
    try:
        return pair.encode(messages=turns, response=response)
    except InputError as exc:
        raise InputError(f"sample {getattr(sample, 'id', '?')!r}: {exc}") from exc


def _with_videos(turns: tuple[Turn, ...], sample: Any, first: bool = True) -> tuple[Turn, ...]:
    """The chat with the sample's video (if any) in its last user turn: first, as Qwen places it, or
    after the text for a pair that puts visuals last (``image_first=False``, e.g. the video organism)."""
    from lens.datasets.sample import sample_videos

    videos = sample_videos(sample)
    if not videos:
        return turns
    last = turns[-1]
    parts = videos + last.parts if first else last.parts + videos
    return turns[:-1] + (Turn(last.role, parts),)

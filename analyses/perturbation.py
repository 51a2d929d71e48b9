"""Perturbation study: does low-entropy KL drift go with worse answers?

The paper adds noise to the inputs and reports that a smaller drift of the low-entropy activations
(KL to the base) goes with a lower perplexity of correct answers and a higher perplexity of
incorrect ones. It does not publish the protocol (papers.md §1.5), so the choices made here are:

- **Noise.** Gaussian, on the RLVR model only (the base stays clean: drift is measured to the clean
  base). Two kinds, run separately: ``pixel`` adds ``σ · std(pixel_values) · ε`` to the processed
  (already normalised) pixel values; ``embedding`` adds ``σ · RMS · ε`` to the input of decoder
  layer 0 at the visual positions, RMS being the root mean square of those clean visual
  embeddings (one scalar per sample). σ = 0 is always included as the clean reference.
- **Common random numbers.** One ``ε`` per (seed, sample, noise kind), reused for every σ and for
  both answers, so within a sample only the magnitude changes along the sweep and the correct and
  incorrect answers see the very same perturbed image. Seeds are derived from the sample id, so a
  resumed run or a subset gives the same numbers.
- **Drift.** Mean KL(P_base ‖ P_rlvr) of the logit lens (full vocabulary, float32, as in
  :mod:`lens.logit_lens`) pooled over the Activation Replay mask: visual tokens whose clean base
  entropy is ≤ τ · the layer's max over visual tokens (τ = 0.4; or, with ``mask_rule="quantile"``,
  ≤ the layer's q-quantile over visual tokens, for models whose early-layer entropies are
  near-uniform and τ·max selects nothing), over layers ``0 .. L/2 - 1`` by
  default (the released config replays the first 16 of 28 layers). The mask comes from the clean
  base, so it is the same set of positions at every σ. ``kl_visual_all`` (all visual tokens of those
  layers) is kept as a contrast.
- **Perplexity.** Teacher forced under the perturbed RLVR model: ``exp(mean NLL)`` over the response
  tokens including the final EOS (the model must also stop). The visual positions precede the
  response, so the drift does not depend on which answer is appended.
- **Answers.** Correct: the dataset answer rendered by ``formatter`` (``"answer N"`` for the
  organism). Incorrect, one per sample, in this order of preference: a supplied response for that
  sample; else (``incorrect="sampled"``) the most frequent wrong response among ``n_incorrect_draws``
  samples of the clean RLVR model (T = 1, vision special tokens suppressed), used verbatim; else the
  deterministic fallback ``formatter(answer + 1)``. The source is recorded per sample.
- **Statistics.** Spearman ρ between drift and PPL, for correct and incorrect answers separately
  and per noise kind, in two scopes: ``pooled`` (all sample × σ points) and ``within_sample`` (ρ
  across σ inside each sample, averaged over samples; removes between-sample differences such as
  easy vs hard images). 95% CIs come from a cluster bootstrap over samples, because the points of
  one sample are not independent. The pooled p-value treats points as independent and is optimistic.

The code is split by idea, every name importable from here: settings in
:mod:`analyses.perturb_config`, noise in :mod:`analyses.perturb_noise`, drift and perplexity in
:mod:`analyses.perturb_measure`, answers in :mod:`analyses.perturb_answers`, tables and statistics
in :mod:`analyses.perturb_tables`; this module runs the study.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

# The study is split by idea; every name stays importable from here.
from analyses.perturb_answers import (  # noqa: F401  (public API of the perturbation study)
    choose_incorrect,
    load_incorrect,
    offset_answer,
    organism_extract,
    organism_response,
    same_answer,
    sample_responses,
)
from analyses.perturb_config import (  # noqa: F401
    ANSWER_KINDS,
    INCORRECT_SOURCES,
    NOISE_KINDS,
    SCOPES,
    PerturbConfig,
    parse_sigmas,
)
from analyses.perturb_measure import (  # noqa: F401
    BaseReference,
    base_reference,
    measure,
    perplexity,
    response_nll,
    visual_kl,
)
from analyses.perturb_noise import (  # noqa: F401
    draw_eps,
    embedding_noise,
    noise_generator,
    perturbed,
    pixel_noised,
)
from analyses.perturb_tables import (  # noqa: F401
    TABLE_COLUMNS,
    cluster_bootstrap,
    correlation_table,
    perturb_table,
    sigma_summary,
    within_sample_rhos,
)
from lens.datasets import sample_images
from lens.errors import DatasetError
from lens.fingerprint import pair_fingerprint, sample_digests
from lens.records import RecordWriter, write_tables


def check_samples(samples: Sequence[Any]) -> None:
    """Refuse datasets the PPL study cannot use.

    Raises:
        DatasetError: No samples, samples without an answer, or samples without an image.
    """
    if not samples:
        raise DatasetError("the dataset has no samples")
    no_answer = [str(s.id) for s in samples if getattr(s, "answer", None) in (None, "")]
    if no_answer:
        shown = ", ".join(no_answer[:5]) + (" ..." if len(no_answer) > 5 else "")
        raise DatasetError(
            f"the perplexity study needs an 'answer' for every sample; {len(no_answer)} of "
            f"{len(samples)} have none ({shown})"
        )
    no_image = [str(s.id) for s in samples if not sample_images(s)]
    if no_image:
        raise DatasetError(
            f"the perturbation study needs an image for every sample; {len(no_image)} have none "
            f"({', '.join(no_image[:5])})"
        )


def perturb_record(
    pair: Any,
    sample: Any,
    config: PerturbConfig,
    formatter: Callable[[str], str] = organism_response,
    extract: Callable[[str], str | None] = organism_extract,
    supplied_incorrect: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """All measurements of one sample (every noise kind and σ), as a record."""
    images = sample_images(sample)
    correct = formatter(str(sample.answer))
    prompt_inputs = pair.encode(sample.question, images)
    incorrect, source = choose_incorrect(
        pair, sample, prompt_inputs, config, formatter, extract, supplied_incorrect
    )
    answers = {
        "correct": pair.encode(sample.question, images, response=correct),
        "incorrect": pair.encode(sample.question, images, response=incorrect),
    }
    layers = config.drift_layers(pair.n_layers)
    reference = base_reference(pair, answers["correct"], layers, config.mask, config.token_chunk)
    rows = []
    clean: dict[str, Any] | None = None
    for kind in config.kinds:
        eps = draw_eps(pair, answers["correct"], kind, noise_generator(config.seed, str(sample.id), kind))
        for sigma in config.sigmas:
            if sigma == 0 and clean is not None:
                # σ = 0 is the same clean forward for every noise kind.
                rows.append({**clean, "noise_kind": kind})
                continue
            row = measure(pair, reference, answers, kind, sigma, eps, config.token_chunk)
            if sigma == 0:
                clean = row
            rows.append(row)
    return {
        "question": sample.question,
        "answer": str(sample.answer),
        "qtype": getattr(sample, "qtype", None),
        "correct_response": correct,
        "incorrect_response": incorrect,
        "incorrect_source": source,
        "layers": list(layers),
        "n_visual": int(reference.mask.shape[1]),
        "n_masked": int(reference.mask.sum()),
        "rows": rows,
    }


@dataclass(frozen=True)
class PerturbResult:
    """Outputs of a perturbation run."""

    table: pd.DataFrame
    correlations: pd.DataFrame
    summary: pd.DataFrame
    out_dir: Path | None = None


def run_perturbation(
    pair: Any,
    samples: Sequence[Any],
    out_dir: str | Path | None = None,
    config: PerturbConfig = PerturbConfig(),
    formatter: Callable[[str], str] = organism_response,
    extract: Callable[[str], str | None] = organism_extract,
    incorrect: Mapping[str, str] | None = None,
    resume: bool = True,
    progress: bool = False,
    title: str | None = None,
    shard: Any = None,
) -> PerturbResult | None:
    """Run the perturbation study over a dataset.

    Args:
        pair: A :class:`lens.ModelPair` with a multimodal adapter.
        samples: Items with ``id``, ``question``, one or more images and ``answer`` (``qtype`` optional).
        out_dir: Where to write ``records.jsonl``, ``perturb_table.csv``,
            ``perturb_spearman.csv``, ``perturb_summary.csv`` and ``perturbation.{pdf,png}``;
            ``None`` keeps everything in memory.
        config: Noise levels and kinds, mask, seed, incorrect-answer policy, bootstrap size.
        formatter: Renders an answer as a response (``"answer N"`` for the organism).
        extract: The answer a sampled response gives (``None`` for a malformed one); a draw is
            wrong when its answer differs from the dataset's.
        incorrect: Supplied incorrect responses by sample id (they take precedence).
        resume: Keep records already in ``out_dir`` and skip their samples.
        progress: Show a progress bar.
        title: Figure title.
        shard: This process's :class:`lens.distributed.Shard` of a data-parallel run: compute only
            its samples, into its shard folder, and return ``None`` (the merge draws the tables).

    Returns:
        The tidy table, the correlation table and the per-σ summary (``None`` for a shard).

    Raises:
        DatasetError: No samples, or samples without an answer or an image.
    """
    check_samples(samples)
    from tqdm.auto import tqdm

    def records_for(todo: Sequence[Any]) -> Iterator[tuple[Any, dict[str, Any]]]:
        for sample in tqdm(todo, desc="perturb", unit="sample", disable=not progress):
            yield sample, perturb_record(pair, sample, config, formatter, extract, incorrect)

    if out_dir is None:
        records = [{"sample_id": str(s.id), **rec} for s, rec in records_for(samples)]
    else:
        out = Path(out_dir)
        settings = {"pair": list(getattr(pair, "names", ())), **asdict(config)}
        settings.pop("n_boot")  # statistics are computed after the records
        writer = RecordWriter(
            out / "records.jsonl", resume, settings, pair_fingerprint(pair), sample_digests(samples), shard
        )
        with writer:
            for sample, record in records_for([s for s in samples if writer.todo(str(s.id))]):
                writer.write(str(sample.id), record)
        if writer.partial:
            return None
        records = writer.read(str(s.id) for s in samples)
    table = perturb_table(records)
    correlations = correlation_table(table, config.n_boot, config.seed)
    summary = sigma_summary(table)
    if out_dir is not None:
        out = Path(out_dir)
        write_tables(
            out, {"perturb_table": table, "perturb_spearman": correlations, "perturb_summary": summary}
        )
        import matplotlib.pyplot as plt

        from lens.plot.perturbation import plot_perturbation
        from lens.plot.style import save_figure

        fig = plot_perturbation(table, correlations, title=title)
        save_figure(fig, out / "perturbation")
        plt.close(fig)
    return PerturbResult(table, correlations, summary, None if out_dir is None else Path(out_dir))

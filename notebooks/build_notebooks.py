"""Write the five figure notebooks (``01_kl_by_entropy`` ... ``05_organism``) with nbformat.

The notebooks are committed with their outputs stripped; edit this script and run

    python notebooks/build_notebooks.py

to regenerate them. Each notebook lists the figures it writes in its metadata
(``metadata["replay_lens"]["figures"]``, stems relative to ``figures/``); ``tests/test_notebooks.py``
executes every notebook and checks those files.

Every notebook finds the repository root by walking up from its working directory to the folder
holding ``pyproject.toml``, writes figures to ``<root>/figures`` (or ``$REPLAY_LENS_FIGURES``) and
intermediate runs to ``<root>/runs/notebooks/<name>`` (or ``$REPLAY_LENS_RUNS/<name>``), which it
deletes first so that re-running gives the same numbers.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''
import os
import shutil
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import Image, display
from transformers.utils import logging as hf_logging

torch.set_num_threads(2)  # the organism is tiny; more threads only add overhead on a shared CPU
hf_logging.disable_progress_bar()  # no "Loading weights" bars in the outputs
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
pd.set_option("display.width", 160)
START = time.perf_counter()


def find_root(start: Path) -> Path:
    """The repository root: the first folder at or above ``start`` holding pyproject.toml."""
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    raise FileNotFoundError(f"no pyproject.toml at or above {start}")


ROOT = find_root(Path.cwd().resolve())
FIGURES = Path(os.environ.get("REPLAY_LENS_FIGURES", ROOT / "figures"))
RUN = Path(os.environ.get("REPLAY_LENS_RUNS", ROOT / "runs" / "notebooks")) / "{name}"
FIGURES.mkdir(parents=True, exist_ok=True)
shutil.rmtree(RUN, ignore_errors=True)  # a fresh run each time, so re-execution is deterministic


def save(fig, stem: str, width: int = 720) -> None:
    """Write figures/<stem>.pdf and .png with the package's style helper and show the PNG."""
    from lens.plot.style import save_figure

    pdf, png = save_figure(fig, FIGURES / stem)
    plt.close(fig)
    print(f"wrote {pdf.relative_to(FIGURES.parent)} and {png.name}")
    display(Image(filename=str(png), width=width))
'''


def setup(name: str) -> str:
    return SETUP.replace("{name}", name)


FOOTER = """
print(f"notebook ran in {time.perf_counter() - START:.0f} s")
"""


def cells_of(spec: list[tuple[str, str]]) -> list:
    out = []
    for kind, text in spec:
        text = textwrap.dedent(text).strip("\n")
        out.append(new_markdown_cell(text) if kind == "md" else new_code_cell(text))
    return out


NOTEBOOKS: dict[str, dict] = {}

# --------------------------------------------------------------------------------------------------
NOTEBOOKS["01_kl_by_entropy"] = {
    "figures": ["01_kl_by_entropy", "01_layer_token_heatmaps", "01_visual_grid"],
    "cells": [
        (
            "md",
            """
            # 01 · KL drift by base entropy

            **What it shows.** For every held-out item, the logit lens reads each layer's residual stream
            of the base and of the twin model; for every (layer, token) we get the base model's entropy
            and KL(P_base ‖ P_twin). Tokens are bucketed into base-entropy quintiles (1 = lowest) and
            the mean KL is drawn per bucket, visual and text tokens apart.

            **Paper.** The paper's key figure (arXiv 2511.19972, §3): RLVR shifts *low-entropy*
            activations most, high-entropy ones less. The base → SFT-control curve is the ablation that
            tells an RLVR-specific shift from "any further training". The layer × token heatmaps and
            the visual tokens on the image grid correspond to the paper's per-sample logit-lens
            visualisations.

            Runs on the built-in organism (tiny Qwen2.5-VL trio, CPU) in well under a minute.
            Figures: `figures/01_kl_by_entropy`, `figures/01_layer_token_heatmaps`,
            `figures/01_visual_grid` (each `.pdf` + `.png`).
            """,
        ),
        ("code", setup("01_kl_by_entropy")),
        (
            "code",
            """
            import lens
            from analyses.kl_drift import DriftConfig
            from analyses.set_drift import run_set_drift
            from lens import organism
            from lens.modelset import load_models, organism_sources
            from lens.plot.drift import plot_kl_by_entropy
            from lens.plot.heatmaps import merged_grid, plot_layer_token_heatmaps, plot_visual_grid

            N_ITEMS = 40  # held-out items (the CLI default is 200)
            samples = organism.heldout(N_ITEMS)
            print(organism.manifest()["heldout_greedy"])
            """,
        ),
        (
            "md",
            """
            ## One sample through the lens

            `pair.encode` builds identical inputs for both models together with the token-role map;
            `lens.pair_lens` returns per-(layer, token) base/twin entropies and the KL.
            """,
        ),
        (
            "code",
            """
            pair = lens.load_pair("organism")  # base vs rlvr
            sample = samples[0]
            inputs = pair.encode(sample.question, [sample.image])
            lens_result = lens.pair_lens(pair.base, pair.rlvr, pair.adapter, inputs)
            print(sample.question, "| answer:", sample.answer)
            print("roles:", list(inputs.roles[:6]), "...", "| visual tokens:", len(inputs.visual_positions))
            lens_result.to_frame().head()
            """,
        ),
        (
            "md",
            """
            ## Drift over the held-out items: base → RLVR and base → SFT control
            """,
        ),
        (
            "code",
            """
            # Both twins in one run: the base's forward and lens are shared, once per sample.
            twins = load_models(organism_sources(organism.KNOWN_PAIRS), image_first=organism.IMAGE_FIRST)
            result = run_set_drift(twins, samples, RUN / "twins", DriftConfig(), resume=False)
            buckets = result.buckets

            pooled = buckets[buckets["scope"] == "pooled"].pivot_table(
                index="bucket", columns=["token_group", "comparison"], values="mean_kl"
            )
            pooled.round(4)
            """,
        ),
        (
            "code",
            """
            result.correlations.query("scope == 'pooled'")[["comparison", "token_group", "spearman_rho", "n"]]
            """,
        ),
        (
            "code",
            """
            fig = plot_kl_by_entropy(buckets, title="KL drift by base entropy: RLVR vs SFT control")
            save(fig, "01_kl_by_entropy")
            """,
        ),
        (
            "md",
            """
            ## Layer × token heatmaps of one sample

            Top: base entropy; bottom: KL(P_base ‖ P_rlvr), every layer (rows) and token position
            (columns); the band on top marks each position's role. Then the visual tokens laid out on
            the merged image grid for a few layers, next to the image itself.
            """,
        ),
        (
            "code",
            """
            # The tidy table stays in its Parquet shards; load only this sample's rows.
            table = result.tidy["base→rlvr"].select([sample.id]).to_pandas()
            fig = plot_layer_token_heatmaps(table, sample_id=sample.id, title=f"{sample.id}: {sample.question}")
            save(fig, "01_layer_token_heatmaps")
            """,
        ),
        (
            "code",
            """
            fig = plot_visual_grid(table, grid=merged_grid(inputs), sample_id=sample.id, image=sample.image)
            save(fig, "01_visual_grid")
            """,
        ),
        ("code", FOOTER),
    ],
}

# --------------------------------------------------------------------------------------------------
NOTEBOOKS["02_perturbation"] = {
    "figures": ["02_perturbation"],
    "cells": [
        (
            "md",
            """
            # 02 · Perturbation study: low-entropy drift vs answer perplexity

            **What it shows.** Gaussian noise of increasing magnitude σ is added to the image, once on
            the pixel values and once on the visual-token embeddings. At each σ we measure how far the
            RLVR model's low-entropy visual activations drift from the (clean) base model, as the mean
            logit-lens KL over the Activation Replay mask (visual tokens with base entropy ≤ τ·max),
            and the teacher-forced perplexity of a correct and of an incorrect answer. The claim under
            test: less drift goes with lower perplexity on correct answers and higher perplexity on
            incorrect ones. Spearman ρ with cluster-bootstrap 95% CIs (items resampled) is reported
            per noise kind and answer kind.

            **Paper.** The controlled perturbation experiment that ties low-entropy drift to reasoning
            (arXiv 2511.19972, §3). The paper does not publish its protocol; the choices made here are
            documented in `analyses/perturbation.py`.

            Figure: `figures/02_perturbation.{pdf,png}`.
            """,
        ),
        ("code", setup("02_perturbation")),
        (
            "code",
            """
            import lens
            from analyses.perturbation import PerturbConfig, run_perturbation
            from lens import organism
            from lens.plot.perturbation import plot_perturbation

            N_ITEMS = 24  # held-out items
            config = PerturbConfig(
                sigmas=(0.1, 0.2, 0.4, 0.8),  # 0 (clean) is always added
                kinds=("pixel", "embedding"),
                mask_rule="quantile",  # see the note in 03_interventions: tau x max is empty here
                quantile=0.3,
                incorrect="sampled",  # the RLVR model's own wrong answers, else answer + 1
                n_boot=1000,
                seed=0,
            )
            pair = lens.load_pair("organism")
            samples = organism.heldout(N_ITEMS)
            result = run_perturbation(pair, samples, RUN, config, resume=False)
            result.table.head()
            """,
        ),
        (
            "md",
            """
            Mean drift and geometric-mean perplexity per noise level (`ppl_geomean`), then the
            correlations. `pooled` ranks every (item, σ) point together; `within` averages the
            per-item rank correlations over σ, which removes between-item differences.
            """,
        ),
        (
            "code",
            """
            result.summary.round(4)
            """,
        ),
        (
            "code",
            """
            result.correlations.round(3)
            """,
        ),
        (
            "code",
            """
            fig = plot_perturbation(result.table, result.correlations, title=f"organism, {N_ITEMS} held-out items")
            save(fig, "02_perturbation")
            """,
        ),
        ("code", FOOTER),
    ],
}

# --------------------------------------------------------------------------------------------------
NOTEBOOKS["03_interventions"] = {
    "figures": ["03_pass_at_k", "03_greedy_pass_at_1"],
    "cells": [
        (
            "md",
            """
            # 03 · Interventions: hard injection and Activation Replay

            **What it shows.** Six ways of decoding with the RLVR model, scored by the task's verifier:
            the RLVR and base models as they are; *hard injection* of the base model's residual stream
            into the RLVR model at the low-entropy (`hard-low`) or high-entropy (`hard-high`) visual
            tokens; and *Activation Replay*, which optimises offsets on the visual-token inputs so
            that the RLVR model's low-entropy (`replay`) or high-entropy (`replay-high`) activations
            match the base model's. Per strategy: greedy pass@1 and unbiased pass@k from n = 8
            samples at temperature 1, with 95% bootstrap CIs; Δ vs RLVR is paired over items.

            **Paper.** The low- vs high-entropy intervention study (arXiv 2511.19972, Table 1) and
            the comparison of Activation Replay against replaying high-entropy activations and direct
            cross-model injection.

            Figures: `figures/03_pass_at_k.{pdf,png}`, `figures/03_greedy_pass_at_1.{pdf,png}`.
            """,
        ),
        ("code", setup("03_interventions")),
        (
            "code",
            """
            import numpy as np

            import lens
            from analyses.intervention import InterventionRunConfig, default_layers, run_interventions, wide_table
            from lens import organism
            from lens.interventions import ActivationReplay, HardInjection
            from lens.plot.interventions import plot_pass_at_k
            from lens.plot.style import COLUMN_WIDTH, PALETTE, paper_style

            pair = lens.load_pair("organism")
            layers = default_layers(pair.n_layers)  # the released depth: the first 16/28 of the layers
            print("layers:", layers)
            """,
        ),
        (
            "md",
            """
            ## One item, by hand

            `prepare` computes the edit for one input (the positions and base values to inject, or the
            optimised replay offsets); `generate` decodes with the edit installed.
            """,
        ),
        (
            "code",
            """
            # The released rule (entropy <= tau x max over visual tokens) selects no visual token on the organism:
            # its early-layer visual readouts are near-uniform (5.0-5.6 nats of ln 272). The rank-based
            # rule (the lowest-entropy 30% per layer) is used instead; on 7B models keep the default.
            sample = organism.heldout(1)[0]
            inputs = pair.encode(sample.question, [sample.image])
            for intervention in (
                HardInjection(layers=layers, rule="quantile", quantile=0.3, select="low"),
                ActivationReplay(rule="quantile", quantile=0.3, alpha=10.0, steps=25, layers=layers),
            ):
                intervention.prepare(pair, inputs)
                text = intervention.generate(pair, inputs, max_new_tokens=4).texts[0]
                print(f"{intervention.setting():70s} -> {text!r}  correct={organism.verify(text, sample.answer)}")
            losses = intervention.result.losses
            print(f"replay loss: step 0 {losses[0]:.4f} -> final {intervention.result.final_loss:.4f}")
            """,
        ),
        (
            "md",
            """
            ## All six strategies over held-out items
            """,
        ),
        (
            "code",
            """
            N_ITEMS = 24
            config = InterventionRunConfig(
                n=8, ks=(1, 2, 4, 8), mask_rule="quantile", quantile=0.3, alpha=10.0, steps=25, seed=0
            )
            samples = organism.heldout(N_ITEMS)
            result = run_interventions(pair, samples, RUN, config, resume=False, verify=organism.verify)
            wide_table(result.summary)
            """,
        ),
        (
            "code",
            """
            greedy = result.summary.query("metric == 'greedy_pass@1'")
            greedy[["strategy", "value", "ci_low", "ci_high", "delta_vs_rlvr", "delta_ci_low", "delta_ci_high"]].round(3)
            """,
        ),
        (
            "code",
            """
            fig = plot_pass_at_k(result.summary, title=f"organism, {N_ITEMS} held-out items, n = {config.n}")
            save(fig, "03_pass_at_k")
            """,
        ),
        (
            "md",
            """
            Greedy pass@1 per strategy with its bootstrap CI (the Table 1 numbers as a figure).
            """,
        ),
        (
            "code",
            """
            with paper_style():
                fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.2))
                y = np.arange(len(greedy))
                err = np.vstack([greedy["value"] - greedy["ci_low"], greedy["ci_high"] - greedy["value"]])
                ax.barh(y, greedy["value"], xerr=err, color=PALETTE[: len(greedy)], capsize=2)
                ax.set_yticks(y, greedy["strategy"])
                ax.invert_yaxis()
                ax.set_xlabel("greedy pass@1 (95% bootstrap CI)")
                ax.set_xlim(0, 1)
                fig.tight_layout()
            save(fig, "03_greedy_pass_at_1", width=480)
            """,
        ),
        ("code", FOOTER),
    ],
}

# --------------------------------------------------------------------------------------------------
NOTEBOOKS["04_replay"] = {
    "figures": ["04_ablation_heatmap", "04_pass_at_k", "04_replay_loss"],
    "cells": [
        (
            "md",
            """
            # 04 · Activation Replay: the τ × α grid, pass@k and the replay loss

            **What it shows.** Activation Replay run over a grid of mask thresholds τ (visual tokens
            with base entropy ≤ τ·max are replayed) and step sizes α, next to the plain RLVR model:

            * the ablation heatmap: the change in greedy pass@1 against RLVR per (τ, α), with paired
              bootstrap 95% CIs;
            * pass@k curves (n = 8 samples at temperature 1) of RLVR and every grid cell;
            * the replay loss (masked top-k KL to the base) over the optimisation steps, per cell.

            **Paper.** The τ × α ablation (arXiv 2511.19972, Table 5) and the Pass@K curves showing
            that Activation Replay widens the RLVR model's reasoning coverage.

            Figures: `figures/04_ablation_heatmap`, `figures/04_pass_at_k`, `figures/04_replay_loss`
            (each `.pdf` + `.png`).
            """,
        ),
        ("code", setup("04_replay")),
        (
            "code",
            """
            import lens
            from analyses.intervention import InterventionRunConfig
            from analyses.replay import ReplayGrid, run_replay_grid
            from lens import organism
            from lens.plot.interventions import plot_ablation_heatmap, plot_pass_at_k
            from lens.plot.training import plot_replay_loss

            N_ITEMS = 16  # 7 settings x 16 items; each replay cell optimises 25 steps per item
            # The paper's grid is tau in {0.2, 0.4} x alpha in {10, 20, 40}; on the organism the tau x max
            # mask is empty (near-uniform visual readouts), so the mask is rank-based: q = lowest fraction.
            grid = ReplayGrid(quantiles=(0.2, 0.3), alphas=(10.0, 20.0, 40.0))
            config = InterventionRunConfig(n=8, ks=(1, 2, 4, 8), mask_rule="quantile", steps=25, seed=0)
            pair = lens.load_pair("organism")
            result = run_replay_grid(
                pair, organism.heldout(N_ITEMS), RUN, grid, config, resume=False, verify=organism.verify
            )
            columns = ["quantile", "alpha", "greedy_pass@1", "delta_vs_rlvr", "delta_ci_low", "delta_ci_high"]
            result.ablation[columns + ["mean_first_loss", "mean_final_loss"]].round(4)
            """,
        ),
        (
            "code",
            """
            fig = plot_ablation_heatmap(result.ablation, title=f"Activation Replay, {N_ITEMS} held-out items")
            save(fig, "04_ablation_heatmap", width=480)
            """,
        ),
        (
            "md",
            """
            pass@k of the RLVR model and of every grid cell. Every cell is the strategy `replay`, so
            each curve is labelled by its (q, α) setting.
            """,
        ),
        (
            "code",
            """
            def label(setting: str) -> str:
                if not setting.startswith("replay"):
                    return setting
                params = dict(p.split("=") for p in setting[setting.index("[") + 1 : -1].split(",") if "=" in p)
                return f"replay q={params['q']}, α={params['alpha']}"


            passk = result.summary.assign(strategy=result.summary["setting"].map(label))
            fig = plot_pass_at_k(passk, title=f"RLVR vs Activation Replay, n = {config.n}")
            save(fig, "04_pass_at_k")
            """,
        ),
        (
            "code",
            """
            fig = plot_replay_loss(result.losses, title="mean replay loss per step")
            save(fig, "04_replay_loss")
            """,
        ),
        ("code", FOOTER),
    ],
}

# --------------------------------------------------------------------------------------------------
NOTEBOOKS["05_organism"] = {
    "figures": ["05_training_curves", "05_pass_at_k"],
    "cells": [
        (
            "md",
            """
            # 05 · The model organism: training curves and pass@k

            **What it shows.** The built-in organism is a tiny Qwen2.5-VL trio trained offline on a
            shape-counting task: an SFT **base** stopped early, an **RLVR** twin trained from it with
            GRPO (reward = the verifier), and an SFT-**control** twin trained from the base for the same
            number of updates. The first figure draws the shipped training log
            (`lens/organism/weights/training_log.csv`): the SFT loss, the GRPO reward, and the
            validation accuracy of each phase. The second draws pass@k of the three models on held-out
            items (n = 8 samples at temperature 1, 95% bootstrap CIs), overall and per question type.

            **Paper.** The organism reproduces in miniature the RLVR behaviour the paper builds on:
            RLVR raises pass@1 while pass@k at large k rises less or falls, i.e. a narrower reasoning
            coverage than the base (the Pass@K comparisons of arXiv 2511.19972).

            Figures: `figures/05_training_curves`, `figures/05_pass_at_k` (each `.pdf` + `.png`).
            """,
        ),
        ("code", setup("05_organism")),
        (
            "code",
            """
            import json

            from analyses.evaluate import EvalConfig, evaluate, plot_pass_at_k, wide_table
            from lens import organism
            from lens.organism.model import Encoder
            from lens.plot.style import PAGE_WIDTH, PALETTE, paper_style

            manifest = organism.manifest()
            log = pd.read_csv(organism.weights_dir() / "training_log.csv")
            print(json.dumps({k: manifest[k] for k in ("seed", "sft_steps", "rl_steps", "rl_updates")}))
            pd.DataFrame(manifest["heldout_greedy"]).T
            """,
        ),
        (
            "code",
            """
            def smooth(series: pd.Series, window: int = 10) -> pd.Series:
                return series.rolling(window, min_periods=1, center=True).mean()


            phases = {"sft": "SFT base", "grpo": "GRPO → rlvr", "control": "SFT → control"}
            colours = {"sft": PALETTE[0], "grpo": PALETTE[1], "control": PALETTE[2]}
            sft_steps = int(log.query("phase == 'sft'")["step"].max())
            offset = {"sft": 0, "grpo": sft_steps, "control": sft_steps}  # the twins start from the base
            with paper_style():
                fig, (loss_ax, reward_ax, acc_ax) = plt.subplots(1, 3, figsize=(PAGE_WIDTH, 2.2))
                for phase in ("sft", "control"):
                    rows = log[log["phase"] == phase]
                    x = rows["step"] + offset[phase]
                    loss_ax.plot(x, smooth(rows["loss"]), color=colours[phase])
                loss_ax.set_ylabel("SFT loss, smoothed [nats]")

                rl = log[log["phase"] == "grpo"]
                x = rl["step"] + offset["grpo"]
                reward_ax.plot(x, rl["reward"], color=colours["grpo"], lw=0.4, alpha=0.35)
                reward_ax.plot(x, smooth(rl["reward"], 20), color=colours["grpo"])
                reward_ax.set_ylabel("GRPO reward (batch mean)")
                reward_ax.set_ylim(0, 1)

                for phase in phases:
                    rows = log[(log["phase"] == phase) & log["val_acc"].notna()]
                    x = rows["step"] + offset[phase]
                    acc_ax.plot(x, rows["val_acc"], color=colours[phase], marker="o", ms=1.5)
                acc_ax.set_ylabel("validation accuracy")
                acc_ax.set_ylim(0, 1)
                for ax in (loss_ax, reward_ax, acc_ax):
                    ax.axvline(sft_steps, color="0.6", lw=0.6, ls="--")
                    ax.set_xlabel("optimizer step")
                handles = [plt.Line2D([], [], color=colours[p], label=label) for p, label in phases.items()]
                fig.tight_layout(rect=(0, 0, 1, 0.88), w_pad=1.5)
                fig.legend(handles=handles, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 1.0))
            save(fig, "05_training_curves")
            """,
        ),
        (
            "md",
            """
            ## pass@k of base, RLVR and control
            """,
        ),
        (
            "code",
            """
            N_ITEMS = 64
            cfg = EvalConfig(ks=(1, 2, 4, 8), n=8, seed=0)
            loaded = {name: organism.load_model(name) for name in organism.MODEL_NAMES}
            encoder = Encoder(loaded["base"][1])
            models = {name: model for name, (model, _, _) in loaded.items()}
            result = evaluate(models, encoder, organism.heldout(N_ITEMS), organism.verify, cfg)
            wide_table(result.summary).loc[lambda t: t.index.get_level_values("qtype") == "all"]
            """,
        ),
        (
            "code",
            """
            d = result.differences
            d[d["qtype"] == "all"].round(3)
            """,
        ),
        (
            "code",
            """
            fig = plot_pass_at_k(result.summary, title=f"organism, {N_ITEMS} held-out items, n = {cfg.n}")
            save(fig, "05_pass_at_k")
            """,
        ),
        ("code", FOOTER),
    ],
}


def build(name: str, spec: dict) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells_of(spec["cells"]))
    nb.metadata.update(
        {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
            "replay_lens": {"figures": spec["figures"]},
        }
    )
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"  # stable ids: regenerating gives no diff
    return nb


def main() -> None:
    for name, spec in NOTEBOOKS.items():
        nb = build(name, spec)
        nbformat.validate(nb)
        path = HERE / f"{name}.ipynb"
        nbformat.write(nb, path)
        print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: replay_lens,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   replay_lens:
#     figures:
#     - 02_perturbation
# ---

# %% [markdown]
# # 02 · Perturbation study: low-entropy drift vs answer perplexity
#
# **What it shows.** Gaussian noise of increasing magnitude σ is added to the image, once on
# the pixel values and once on the visual-token embeddings. At each σ we measure how far the
# RLVR model's low-entropy visual activations drift from the (clean) base model, as the mean
# logit-lens KL over the Activation Replay mask (visual tokens with base entropy ≤ τ·max),
# and the teacher-forced perplexity of a correct and of an incorrect answer. The claim under
# test: less drift goes with lower perplexity on correct answers and higher perplexity on
# incorrect ones. Spearman ρ with cluster-bootstrap 95% CIs (items resampled) is reported
# per noise kind and answer kind.
#
# **Paper.** The controlled perturbation experiment that ties low-entropy drift to reasoning
# (arXiv 2511.19972, §3). The paper does not publish its protocol; the choices made here are
# documented in `analyses/perturbation.py`.
#
# Figure: `figures/02_perturbation.{pdf,png}`.

# %%
from lens.notebook import setup

session = setup("02_perturbation")  # the repository root, figures/ and a fresh runs/notebooks/02_perturbation
RUN, save = session.run, session.save

# %%
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

# %% [markdown]
# Mean drift and geometric-mean perplexity per noise level (`ppl_geomean`), then the
# correlations. `pooled` ranks every (item, σ) point together; `within` averages the
# per-item rank correlations over σ, which removes between-item differences.

# %%
result.summary.round(4)

# %%
result.correlations.round(3)

# %%
fig = plot_perturbation(result.table, result.correlations, title=f"organism, {N_ITEMS} held-out items")
save(fig, "02_perturbation")

# %%
session.finish()

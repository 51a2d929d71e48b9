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
#     - 01_kl_by_entropy
#     - 01_layer_token_heatmaps
#     - 01_visual_grid
# ---

# %% [markdown]
# # 01 · KL drift by base entropy
#
# **What it shows.** For every held-out item, the logit lens reads each layer's residual stream
# of the base and of the twin model; for every (layer, token) we get the base model's entropy
# and KL(P_base ‖ P_twin). Tokens are bucketed into base-entropy quintiles (1 = lowest) and
# the mean KL is drawn per bucket, visual and text tokens apart.
#
# **Paper.** The paper's key figure (arXiv 2511.19972, §3): RLVR shifts *low-entropy*
# activations most, high-entropy ones less. The base → SFT-control curve is the ablation that
# tells an RLVR-specific shift from "any further training". The layer × token heatmaps and
# the visual tokens on the image grid correspond to the paper's per-sample logit-lens
# visualisations.
#
# Runs on the built-in organism (tiny Qwen2.5-VL trio, CPU) in well under a minute.
# Figures: `figures/01_kl_by_entropy`, `figures/01_layer_token_heatmaps`,
# `figures/01_visual_grid` (each `.pdf` + `.png`).

# %%
from lens.notebook import setup

session = setup("01_kl_by_entropy")  # the repository root, figures/ and a fresh runs/notebooks/01_kl_by_entropy
RUN, save = session.run, session.save

# %%
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

# %% [markdown]
# ## One sample through the lens
#
# `pair.encode` builds identical inputs for both models together with the token-role map;
# `lens.pair_lens` returns per-(layer, token) base/twin entropies and the KL.

# %%
pair = lens.load_pair("organism")  # base vs rlvr
sample = samples[0]
inputs = pair.encode(sample.question, [sample.image])
lens_result = lens.pair_lens(pair.base, pair.rlvr, pair.adapter, inputs)
print(sample.question, "| answer:", sample.answer)
print("roles:", list(inputs.roles[:6]), "...", "| visual tokens:", len(inputs.visual_positions))
lens_result.to_frame().head()

# %% [markdown]
# ## Drift over the held-out items: base → RLVR and base → SFT control

# %%
# Both twins in one run: the base's forward and lens are shared, once per sample.
twins = load_models(organism_sources(organism.KNOWN_PAIRS), image_first=organism.IMAGE_FIRST)
result = run_set_drift(twins, samples, RUN / "twins", DriftConfig(), resume=False)
buckets = result.buckets

pooled = buckets[buckets["scope"] == "pooled"].pivot_table(
    index="bucket", columns=["token_group", "comparison"], values="mean_kl"
)
pooled.round(4)

# %%
result.correlations.query("scope == 'pooled'")[["comparison", "token_group", "spearman_rho", "n"]]

# %%
fig = plot_kl_by_entropy(buckets, title="KL drift by base entropy: RLVR vs SFT control")
save(fig, "01_kl_by_entropy")

# %% [markdown]
# ## Layer × token heatmaps of one sample
#
# Top: base entropy; bottom: KL(P_base ‖ P_rlvr), every layer (rows) and token position
# (columns); the band on top marks each position's role. Then the visual tokens laid out on
# the merged image grid for a few layers, next to the image itself.

# %%
# The tidy table stays in its Parquet shards; load only this sample's rows.
table = result.tidy["base→rlvr"].select([sample.id]).to_pandas()
fig = plot_layer_token_heatmaps(table, sample_id=sample.id, title=f"{sample.id}: {sample.question}")
save(fig, "01_layer_token_heatmaps")

# %%
fig = plot_visual_grid(table, grid=merged_grid(inputs), sample_id=sample.id, image=sample.image)
save(fig, "01_visual_grid")

# %%
session.finish()

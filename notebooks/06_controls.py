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
#     - 06_power_curve
#     - 06_injection_recovery
#     - 06_replay_cosines
# ---

# %% [markdown]
# # 06 · Planted twins: what the drift analysis, injection and replay can see
#
# **What it shows.** On the organism every result about the paper's method is null or mixed, so
# here the answer is known in advance: `lens.controls.plant` makes a twin whose RLVR side is the
# base plus one edit, a fixed random direction of RMS `size` × the residual's RMS added at the input
# of layer 0 on the base's lowest-entropy visual tokens (`low`, the rank-based fraction q = 0.2), the
# highest (`high`) or random visual tokens (`random`). Three checks, each a tidy table from
# `analyses/controls.py`, then a figure from `lens/plot/controls.py`:
#
# 1. **Detection power.** Does the drift analysis put the most visual KL in base-entropy bucket 1?
#    P(bucket 1's mean KL > every other bucket's) against the plant size, per location, at the
#    planted layer and pooled over layers, with Wilson 95% CIs over replicates (each replicate has
#    its own direction and items). For `high` plants the planted (top) bucket is drawn dashed;
#    `random` plants give the false-alarm rate of "bucket 1 is largest".
# 2. **Recovery by injection.** Greedy accuracy of the planted twin, the base, and hard-low /
#    hard-high injection at layer 0 (quantile mask, q = 0.2), on `low` and `high` plants of size 4,
#    with bootstrap 95% CIs over items.
# 3. **Replay's Δ against the plant.** Activation Replay (layer 0, quantile mask, 25 steps) on a
#    `low` plant of size 2: cosine(Δ, planted offset) at the planted tokens (−1 would undo the plant
#    exactly) and at the other visual tokens, for the released loss and the paper variant.
#
# **Sizes here** (so that CI executes this notebook in about 2 minutes on 2 cores): power curve
# sizes {0, 0.1, 0.5} × 3 locations × 4 replicates × 2 items; recovery on 24 held-out items;
# replay on 4 items at α = 1000. These small runs show the shape, not tight CIs. The full curves
# (≥ 100 items per point) come from
#
# ```bash
# python -m analyses.controls --parts recovery,replay --recovery-items 120 --replay-items 20 --out runs/controls
# python -m analyses.controls --parts power --sizes 0,0.1,0.5 --replicates 10 --items 10 --out runs/controls
# ```
#
# which writes the same tables (`controls_*.csv`) and figures into `runs/controls/`; their numbers
# are in the README ("What the tools can see"). The asserted versions of each claim are
# `tests/test_controls.py` and `tests/test_controls_perturbation.py`.
#
# Figures: `figures/06_power_curve`, `figures/06_injection_recovery`, `figures/06_replay_cosines`
# (`.pdf` and `.png`).

# %%
from lens.notebook import setup

session = setup("06_controls")  # the repository root, figures/ and a fresh runs/notebooks/06_controls
RUN, save = session.run, session.save

# %%
import lens
from analyses.controls import (
    cosine_summary,
    detection_power,
    drift_detection,
    injection_recovery,
    recovery_summary,
    replay_cosines,
)
from lens import organism
from lens.plot.controls import plot_detection_power, plot_injection_recovery, plot_replay_cosines

pair = lens.load_pair("organism")
SIZES = (0.0, 0.1, 0.5)  # plant RMS relative to the residual's RMS at layer 0's input
REPLICATES, ITEMS_PER_REPLICATE = 4, 2
RECOVERY_ITEMS, REPLAY_ITEMS = 24, 4

# %% [markdown]
# ## 1 · Detection power against plant size
#
# One row per (location, size, replicate, scope): the bucket whose mean visual KL is largest
# (`winner`, 0 on a tie such as the all-zero KL of a size-0 plant) and each bucket's mean KL.

# %%
detection = drift_detection(
    pair,
    organism.heldout(REPLICATES * ITEMS_PER_REPLICATE),
    SIZES,
    wheres=("low", "high", "random"),
    replicates=REPLICATES,
    n_items=ITEMS_PER_REPLICATE,
)
power = detection_power(detection)
power.round(3)

# %%
fig = plot_detection_power(power)
save(fig, "06_power_curve")

# %% [markdown]
# ## 2 · Recovery by hard injection
#
# `same_as_base` is the share of greedy answers identical to the base's. The injection's quantile
# mask uses the plant's own rule and fraction, so exact recovery checks that the machinery composes
# (selection, depth pairing, hook order); it is not a discovery.

# %%
recovery = injection_recovery(pair, organism.heldout(RECOVERY_ITEMS), wheres=("low", "high"), size=4.0)
recovery_table = recovery_summary(recovery)
recovery_table.round(3)

# %%
fig = plot_injection_recovery(recovery_table)
save(fig, "06_injection_recovery")

# %% [markdown]
# ## 3 · Activation Replay: Δ against the planted offset
#
# One row per visual token; `delta_ratio` is |Δ| / |plant| and `loss_ratio` the replay loss's final
# over first value. The CIs come from a bootstrap over items.

# %%
cosines = replay_cosines(
    pair, organism.heldout(REPLAY_ITEMS), variants=("released", "paper"), alphas=(1000.0,)
)
cosine_table = cosine_summary(cosines)
cosine_table.round(3)

# %%
fig = plot_replay_cosines(cosines, cosine_table)
save(fig, "06_replay_cosines")

# %% [markdown]
# **Reading.** A `low` plant is found in bucket 1 at its layer from the smallest size on, while a
# `random` plant also "wins" bucket 1 in a good share of replicates (few visual tokens per image),
# so bucket 1 winning is weak evidence alone; a `high` plant lands in the top buckets at its layer.
# Hard-low injection undoes a `low` plant and hard-high a `high` one. Replay's Δ points weakly
# against the plant at the planted tokens (cosine ≈ −0.12) and is small, so it cancels what the
# lens reads rather than the plant itself.

# %%
session.finish()

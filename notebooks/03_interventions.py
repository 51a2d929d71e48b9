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
#     - 03_pass_at_k
#     - 03_greedy_pass_at_1
# ---

# %% [markdown]
# # 03 · Interventions: hard injection and Activation Replay
#
# **What it shows.** Six ways of decoding with the RLVR model, scored by the task's verifier:
# the RLVR and base models as they are; *hard injection* of the base model's residual stream
# into the RLVR model at the low-entropy (`hard-low`) or high-entropy (`hard-high`) visual
# tokens; and *Activation Replay*, which optimises offsets on the visual-token inputs so
# that the RLVR model's low-entropy (`replay`) or high-entropy (`replay-high`) activations
# match the base model's. Per strategy: greedy pass@1 and unbiased pass@k from n = 8
# samples at temperature 1, with 95% bootstrap CIs; Δ vs RLVR is paired over items.
#
# **Paper.** The low- vs high-entropy intervention study (arXiv 2511.19972, Table 1) and
# the comparison of Activation Replay against replaying high-entropy activations and direct
# cross-model injection.
#
# Figures: `figures/03_pass_at_k.{pdf,png}`, `figures/03_greedy_pass_at_1.{pdf,png}`.

# %%
import matplotlib.pyplot as plt

from lens.notebook import setup

session = setup("03_interventions")  # the repository root, figures/ and a fresh runs/notebooks/03_interventions
RUN, save = session.run, session.save

# %%
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

# %% [markdown]
# ## One item, by hand
#
# `prepare` computes the edit for one input (the positions and base values to inject, or the
# optimised replay offsets); `generate` decodes with the edit installed.

# %%
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

# %% [markdown]
# ## All six strategies over held-out items

# %%
N_ITEMS = 24
config = InterventionRunConfig(
    n=8, ks=(1, 2, 4, 8), mask_rule="quantile", quantile=0.3, alpha=10.0, steps=25, seed=0
)
samples = organism.heldout(N_ITEMS)
result = run_interventions(pair, samples, RUN, config, resume=False, verify=organism.verify)
wide_table(result.summary)

# %%
greedy = result.summary.query("metric == 'greedy_pass@1'")
greedy[["strategy", "value", "ci_low", "ci_high", "delta_vs_rlvr", "delta_ci_low", "delta_ci_high"]].round(3)

# %%
fig = plot_pass_at_k(result.summary, title=f"organism, {N_ITEMS} held-out items, n = {config.n}")
save(fig, "03_pass_at_k")

# %% [markdown]
# Greedy pass@1 per strategy with its bootstrap CI (the Table 1 numbers as a figure).

# %%
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

# %%
session.finish()

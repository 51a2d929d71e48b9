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
#     - 04_ablation_heatmap
#     - 04_pass_at_k
#     - 04_replay_loss
# ---

# %% [markdown]
# # 04 · Activation Replay: the τ × α grid, pass@k and the replay loss
#
# **What it shows.** Activation Replay run over a grid of mask thresholds τ (visual tokens
# with base entropy ≤ τ·max are replayed) and step sizes α, next to the plain RLVR model:
#
# * the ablation heatmap: the change in greedy pass@1 against RLVR per (τ, α), with paired
#   bootstrap 95% CIs;
# * pass@k curves (n = 8 samples at temperature 1) of RLVR and every grid cell;
# * the replay loss (masked top-k KL to the base) over the optimisation steps, per cell.
#
# **Paper.** The τ × α ablation (arXiv 2511.19972, Table 5) and the Pass@K curves showing
# that Activation Replay widens the RLVR model's reasoning coverage.
#
# Figures: `figures/04_ablation_heatmap`, `figures/04_pass_at_k`, `figures/04_replay_loss`
# (each `.pdf` + `.png`).

# %%
from lens.notebook import setup

session = setup("04_replay")  # the repository root, figures/ and a fresh runs/notebooks/04_replay
RUN, save = session.run, session.save

# %%
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

# %%
fig = plot_ablation_heatmap(result.ablation, title=f"Activation Replay, {N_ITEMS} held-out items")
save(fig, "04_ablation_heatmap", width=480)


# %% [markdown]
# pass@k of the RLVR model and of every grid cell. Every cell is the strategy `replay`, so
# each curve is labelled by its (q, α) setting.

# %%
def label(setting: str) -> str:
    if not setting.startswith("replay"):
        return setting
    params = dict(p.split("=") for p in setting[setting.index("[") + 1 : -1].split(",") if "=" in p)
    return f"replay q={params['q']}, α={params['alpha']}"


passk = result.summary.assign(strategy=result.summary["setting"].map(label))
fig = plot_pass_at_k(passk, title=f"RLVR vs Activation Replay, n = {config.n}")
save(fig, "04_pass_at_k")

# %%
fig = plot_replay_loss(result.losses, title="mean replay loss per step")
save(fig, "04_replay_loss")

# %%
session.finish()

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
#     - 05_training_curves
#     - 05_pass_at_k
# ---

# %% [markdown]
# # 05 · The model organism: training curves and pass@k
#
# **What it shows.** The built-in organism is a tiny Qwen2.5-VL trio trained offline on a
# shape-counting task: an SFT **base** stopped early, an **RLVR** twin trained from it with
# GRPO (reward = the verifier), and an SFT-**control** twin trained from the base for the same
# number of updates. The first figure draws the shipped training log
# (`lens/organism/weights/training_log.csv`): the SFT loss, the GRPO reward, and the
# validation accuracy of each phase. The second draws pass@k of the three models on held-out
# items (n = 8 samples at temperature 1, 95% bootstrap CIs), overall and per question type.
#
# **Paper.** The organism reproduces in miniature the RLVR behaviour the paper builds on:
# RLVR raises pass@1 while pass@k at large k rises less or falls, i.e. a narrower reasoning
# coverage than the base (the Pass@K comparisons of arXiv 2511.19972).
#
# Figures: `figures/05_training_curves`, `figures/05_pass_at_k` (each `.pdf` + `.png`).

# %%
import matplotlib.pyplot as plt
import pandas as pd

from lens.notebook import setup

session = setup("05_organism")  # the repository root, figures/ and a fresh runs/notebooks/05_organism
RUN, save = session.run, session.save

# %%
import json

from analyses.evaluate import EvalConfig, evaluate, plot_pass_at_k, wide_table
from lens import organism
from lens.organism.model import Encoder
from lens.plot.style import PAGE_WIDTH, PALETTE, paper_style

manifest = organism.manifest()
log = pd.read_csv(organism.weights_dir() / "training_log.csv")
print(json.dumps({k: manifest[k] for k in ("seed", "sft_steps", "rl_steps", "rl_updates")}))
pd.DataFrame(manifest["heldout_greedy"]).T


# %%
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

# %% [markdown]
# ## pass@k of base, RLVR and control

# %%
N_ITEMS = 64
cfg = EvalConfig(ks=(1, 2, 4, 8), n=8, seed=0)
loaded = {name: organism.load_model(name) for name in organism.MODEL_NAMES}
encoder = Encoder(loaded["base"][1])
models = {name: model for name, (model, _, _) in loaded.items()}
result = evaluate(models, encoder, organism.heldout(N_ITEMS), organism.verify, cfg)
wide_table(result.summary).loc[lambda t: t.index.get_level_values("qtype") == "all"]

# %%
d = result.differences
d[d["qtype"] == "all"].round(3)

# %%
fig = plot_pass_at_k(result.summary, title=f"organism, {N_ITEMS} held-out items, n = {cfg.n}")
save(fig, "05_pass_at_k")

# %%
session.finish()

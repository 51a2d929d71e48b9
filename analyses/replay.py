"""Activation Replay ablations: a τ × α grid (the paper's Table 5), loss curves and a heatmap.

With the rank-based mask (``InterventionRunConfig.mask_rule == "quantile"``) the grid's first axis is
the mask quantile q instead of τ (``ReplayGrid.quantiles``); tables and the heatmap say which.

Every grid cell is one :class:`~lens.interventions.ActivationReplay` setting run over the dataset
through :func:`analyses.intervention.run_settings` (same records, same resume), next to the plain
RLVR baseline so each cell gets a paired difference with a bootstrap CI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses.intervention import (
    InterventionRunConfig,
    Verifier,
    _save_plot,
    default_layers,
    run_settings,
    summarise,
)
from lens.errors import ConfigError
from lens.interventions import ActivationReplay, Baseline, Intervention
from lens.masks import check_quantile, check_tau
from lens.records import write_tables

#: The paper's Table 5 grid.
PAPER_TAUS = (0.2, 0.4)
PAPER_ALPHAS = (10.0, 20.0, 40.0)
#: The mask quantiles swept with the rank-based rule.
DEFAULT_QUANTILES = (0.2, 0.3)


@dataclass(frozen=True)
class ReplayGrid:
    """The (τ or q) × α grid (every other replay setting comes from the run config).

    Attributes:
        taus: τ values, the first axis when the run config's ``mask_rule`` is ``"tau_max"``.
        alphas: Step sizes.
        quantiles: Mask quantiles, the first axis when ``mask_rule`` is ``"quantile"``.
    """

    taus: tuple[float, ...] = PAPER_TAUS
    alphas: tuple[float, ...] = PAPER_ALPHAS
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES

    def __post_init__(self) -> None:
        if not self.taus or not self.alphas or not self.quantiles:
            raise ConfigError("the grid needs at least one tau, one quantile and one alpha")
        for tau in self.taus:
            check_tau(tau)
        for quantile in self.quantiles:
            check_quantile(quantile)
        bad = [a for a in self.alphas if not a > 0]
        if bad:
            raise ConfigError(f"alpha must be > 0, got {bad}")

    def mask_values(self, rule: str) -> tuple[str, tuple[float, ...]]:
        """The first axis for a mask rule: ``("tau", taus)`` or ``("quantile", quantiles)``."""
        return ("quantile", self.quantiles) if rule == "quantile" else ("tau", self.taus)


@dataclass(frozen=True)
class ReplayGridResult:
    """Per-item rows, the summary, the ablation table (one row per cell) and mean loss curves."""

    per_item: pd.DataFrame
    summary: pd.DataFrame
    ablation: pd.DataFrame
    losses: pd.DataFrame
    out_dir: Path | None = None


def grid_interventions(
    grid: ReplayGrid, config: InterventionRunConfig, n_layers: int, select: str = "low"
) -> list[tuple[str, Intervention]]:
    """The RLVR baseline plus one replay per (τ or q, α), following ``config.mask_rule``."""
    layers = config.layers if config.layers is not None else default_layers(n_layers)
    out: list[tuple[str, Intervention]] = [("rlvr", Baseline("rlvr"))]
    name = "replay" if select == "low" else "replay-high"
    axis, values = grid.mask_values(config.mask_rule)
    for value in values:
        mask = {"tau": config.tau, "quantile": config.quantile, axis: value}
        for alpha in grid.alphas:
            replay = ActivationReplay(
                **mask,
                rule=config.mask_rule,
                alpha=alpha,
                steps=config.steps,
                layers=layers,
                topk=config.topk,
                variant=config.variant,
                select=select,
            )
            out.append((name, replay))
    return out


def _parse_setting(setting: str) -> dict[str, Any]:
    """``{"rule", "tau" | "quantile", "alpha"}`` from a replay setting string."""
    inside = setting[setting.index("[") + 1 : -1]
    pairs = dict(part.split("=", 1) for part in inside.split(",") if "=" in part)
    if "q" in pairs:
        return {"rule": "quantile", "quantile": float(pairs["q"]), "alpha": float(pairs["alpha"])}
    return {"rule": "tau_max", "tau": float(pairs["tau"]), "alpha": float(pairs["alpha"])}


def ablation_table(per_item: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (τ or q, α): greedy pass@1, Δ vs RLVR with its paired CI, first/final mean loss.

    Columns ``rule`` and ``tau`` (τ·max rule) or ``quantile`` (rank-based rule) name the mask axis.
    """
    rows = []
    greedy = summary[summary["metric"] == "greedy_pass@1"]
    for _, row in greedy[greedy["strategy"].str.startswith("replay")].iterrows():
        items = per_item[per_item["setting"] == row["setting"]]
        rows.append(
            {
                **_parse_setting(row["setting"]),
                "setting": row["setting"],
                "n_items": row["n_items"],
                "greedy_pass@1": row["value"],
                "ci_low": row["ci_low"],
                "ci_high": row["ci_high"],
                "delta_vs_rlvr": row.get("delta_vs_rlvr", np.nan),
                "delta_ci_low": row.get("delta_ci_low", np.nan),
                "delta_ci_high": row.get("delta_ci_high", np.nan),
                "mean_first_loss": float(items["first_loss"].mean()),
                "mean_final_loss": float(pd.to_numeric(items["final_loss"]).mean()),
            }
        )
    return pd.DataFrame(rows)


def loss_curves(per_item: pd.DataFrame) -> pd.DataFrame:
    """Mean loss per step (step = ``steps`` is the final loss), one row per (setting, step)."""
    rows = []
    for setting, items in per_item[per_item["strategy"].str.startswith("replay")].groupby(
        "setting", sort=False
    ):
        curves = np.array(
            [
                list(losses) + [final]
                for losses, final in zip(items["losses"], items["final_loss"], strict=True)
            ]
        )
        for step, values in enumerate(curves.T):
            rows.append(
                {
                    **_parse_setting(setting),
                    "setting": setting,
                    "step": step,
                    "mean_loss": float(values.mean()),
                }
            )
    return pd.DataFrame(rows)


def run_replay_grid(
    pair: Any,
    samples: Sequence[Any],
    out_dir: str | Path | None = None,
    grid: ReplayGrid = ReplayGrid(),
    config: InterventionRunConfig = InterventionRunConfig(),
    select: str = "low",
    resume: bool = True,
    progress: bool = False,
    verify: Verifier | None = None,
    title: str | None = None,
    shard: Any = None,
) -> ReplayGridResult | None:
    """Run the (τ or q) × α grid and write ``records.jsonl``, ``per_item.csv``, ``summary.csv``,
    ``ablation.csv``, ``replay_losses.csv``, ``ablation_heatmap.{png,pdf}`` and ``replay_loss.{png,pdf}``."""
    config = replace(config, strategies=("rlvr", "replay"))
    interventions = grid_interventions(grid, config, pair.n_layers, select)
    per_item = run_settings(
        pair, samples, interventions, config, out_dir, resume, progress, verify, shard, progress_label="replay"
    )
    if per_item is None:  # a shard of a data-parallel run: the merge tabulates
        return None
    summary = summarise(per_item, config.ks, config.n_boot, config.seed)
    ablation = ablation_table(per_item, summary)
    losses = loss_curves(per_item)
    if out_dir is not None:
        out = Path(out_dir)
        write_tables(
            out,
            {
                "per_item": per_item.drop(columns=["losses"]),
                "summary": summary,
                "ablation": ablation,
                "replay_losses": losses,
            },
        )
        _save_plot("plot_ablation_heatmap", ablation, out / "ablation_heatmap", title)
        _save_plot("plot_replay_loss", losses, out / "replay_loss", title)
    return ReplayGridResult(per_item, summary, ablation, losses, None if out_dir is None else Path(out_dir))

"""What each method finds on planted twins: tidy tables for the controls notebook and its full run.

Three measurements, each a function that takes a pair and items and returns a tidy table (one row
per observation), and a summary that turns it into estimates with 95% CIs:

* :func:`drift_detection` / :func:`detection_power`: for each plant location and size and each
  replicate r (its own plant direction, seed r, and its own disjoint items), run the drift analysis
  on the planted twin and record which visual entropy bucket has the largest mean KL, at the planted
  layer and pooled over layers. Power = the fraction of replicates whose bucket 1 strictly exceeds
  every other bucket (and, separately, whose *planted* bucket does: 1 for ``low``/``random``, the top
  bucket for ``high``), with Wilson 95% CIs. A size-0 plant adds nothing whatever its location, so it
  is run once per replicate and its rows are shared by every location.
* :func:`injection_recovery` / :func:`recovery_summary`: greedy accuracy of the planted twin, the
  base, and hard-low / hard-high injection at the planted layer (quantile mask, the plant's fraction),
  per plant location; percentile-bootstrap CIs over items, and the share of answers equal to the base's.
* :func:`replay_cosines` / :func:`cosine_summary`: Activation Replay on a twin planted at layer 0's
  input; cosine(Δ, planted offset) at the planted tokens and at the other visual tokens, per variant
  and step size; CIs from a bootstrap over items (the tokens of one item are not independent).

``python -m analyses.controls --replicates 10 --items 12 --out runs/controls`` writes the three tables
and the notebook's figures at full size (see :func:`main`).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from analyses.intervention import InterventionRunConfig, run_settings
from analyses.kl_drift import DriftConfig, run_drift
from lens.controls import PLANT_SITES, plant
from lens.errors import ConfigError, DatasetError
from lens.interventions import ActivationReplay, Baseline, HardInjection
from lens.metrics import bootstrap_ci

N_BUCKETS = 5  # the drift analysis' entropy quintiles


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion (``(nan, nan)`` for ``n == 0``)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def target_bucket(where: str) -> int:
    """The visual entropy bucket a plant at ``where`` should land in (1 = lowest entropy)."""
    return N_BUCKETS if where == "high" else 1


def _check(sizes: Sequence[float], wheres: Sequence[str]) -> None:
    bad = [w for w in wheres if w not in PLANT_SITES or w == "text"]
    if bad or not wheres:
        raise ConfigError(f"visual plant locations are low, high, random; got {list(wheres)}")
    if not sizes or any(not math.isfinite(float(s)) or float(s) < 0 for s in sizes):
        raise ConfigError(f"plant sizes must be finite and >= 0, got {list(sizes)}")


def _winner(kl: pd.Series) -> int:
    """The bucket whose mean KL strictly exceeds every other's; 0 when none does (e.g. all zero)."""
    top = kl.max()
    leaders = kl.index[kl == top]
    return int(leaders[0]) if len(leaders) == 1 else 0


def drift_detection(
    pair: Any,
    items: Sequence[Any],
    sizes: Sequence[float],
    wheres: Sequence[str] = ("low", "high", "random"),
    replicates: int = 5,
    n_items: int = 3,
    layer: int = 0,
    fraction: float = 0.2,
    on: str = "base",
) -> pd.DataFrame:
    """Which visual entropy bucket the drift analysis puts first, per plant, size, replicate and scope.

    Args:
        pair: The pair whose base gets the plant.
        items: At least ``replicates * n_items`` items with images; replicate r uses the r-th block.
        sizes: Plant sizes (relative RMS).
        wheres: Visual plant locations.
        replicates: Independent replicates (seed r: its own direction and items).
        n_items: Items per replicate.
        layer: The planted layer (the ``"layer"`` scope reads this layer's buckets).
        fraction: Planted fraction q of the visual tokens.
        on: ``"base"`` (no background drift) or ``"rlvr"`` (over the pair's own drift).

    Returns:
        One row per (where, size, replicate, scope) with the winning bucket (``winner``, 0 when tied)
        and the mean visual KL of each bucket (``kl_b1`` .. ``kl_b5``).

    Raises:
        ConfigError: A bad location or size.
        DatasetError: Fewer than ``replicates * n_items`` items.
    """
    _check(sizes, wheres)
    if replicates < 1 or n_items < 1:
        raise ConfigError(f"replicates and n_items must be >= 1, got {replicates}, {n_items}")
    if len(items) < replicates * n_items:
        raise DatasetError(f"{replicates} replicates of {n_items} items need {replicates * n_items} items")
    config = DriftConfig()
    rows = []
    for r in range(replicates):
        block = items[r * n_items : (r + 1) * n_items]
        for size in sizes:
            # A null plant on the base adds exactly nothing wherever it goes: run it once.
            sites = wheres[:1] if float(size) == 0 and on == "base" else wheres
            for where in sites:
                with plant(
                    pair, where=where, size=size, layer=layer, fraction=fraction, seed=r, on=on
                ) as twin:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        buckets = run_drift(twin, block, config=config).buckets
                visual = buckets[buckets.token_group == "visual"]
                for scope, part in (
                    ("layer", visual[visual.layer == layer]),
                    ("pooled", visual[visual.scope == "pooled"]),
                ):
                    kl = part.set_index("bucket").mean_kl.reindex(range(1, N_BUCKETS + 1))
                    for shared in wheres if len(sites) == 1 and len(wheres) > 1 else [where]:
                        rows.append(
                            dict(
                                where=shared, size=float(size), replicate=r, scope=scope, layer=layer,
                                fraction=fraction, on=on, items=n_items, winner=_winner(kl),
                                **{f"kl_b{b}": float(kl[b]) for b in range(1, N_BUCKETS + 1)},
                            )
                        )  # fmt: skip
    return pd.DataFrame(rows)


def detection_power(detection: pd.DataFrame) -> pd.DataFrame:
    """Power per (where, size, scope): P(bucket 1 wins) and P(the planted bucket wins), Wilson CIs.

    Args:
        detection: The table of :func:`drift_detection`.

    Returns:
        One row per (where, scope, size, criterion), ``criterion`` being ``"bucket 1"`` or
        ``"planted bucket"``, with ``power``, ``ci_low``, ``ci_high``, ``hits`` and ``replicates``.
    """
    rows = []
    for (where, scope, size), group in detection.groupby(["where", "scope", "size"], sort=True):
        for criterion, bucket in (("bucket 1", 1), ("planted bucket", target_bucket(str(where)))):
            hits, n = int((group.winner == bucket).sum()), len(group)
            low, high = wilson_interval(hits, n)
            rows.append(
                dict(
                    where=where, scope=scope, size=size, criterion=criterion, target=bucket,
                    power=hits / n, ci_low=low, ci_high=high, hits=hits, replicates=n,
                    items=int(group["items"].iloc[0]),
                )
            )  # fmt: skip
    return pd.DataFrame(rows)


def injection_recovery(
    pair: Any,
    items: Sequence[Any],
    wheres: Sequence[str] = ("low", "high"),
    size: float = 4.0,
    layer: int = 0,
    fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Greedy answers of the planted twin, the base, and hard-low / hard-high injection, per plant.

    The injections replace the twin's residual by the base's at the planted layer on the visual
    tokens of the quantile mask with the plant's own fraction (so hard-low selects a ``low`` plant's
    tokens exactly).

    Returns:
        One row per (where, strategy, item): ``greedy`` (1 when correct), ``response`` and
        ``same_as_base`` (the greedy response equals the base's).
    """
    _check([size], wheres)
    config = InterventionRunConfig(n=0, batch_size=batch_size, mask_rule="quantile", quantile=fraction)
    frames = []
    for where in wheres:
        with plant(pair, where=where, size=size, layer=layer, fraction=fraction, seed=seed) as twin:
            strategies = [
                ("planted", Baseline()),
                ("base", Baseline("base")),
                (
                    "hard-low",
                    HardInjection(layers=(layer,), select="low", rule="quantile", quantile=fraction),
                ),
                (
                    "hard-high",
                    HardInjection(layers=(layer,), select="high", rule="quantile", quantile=fraction),
                ),
            ]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                table = run_settings(twin, items, strategies, config)
        table = table[["strategy", "item", "greedy", "response"]].copy()
        base = table[table.strategy == "base"].set_index("item").response
        table["same_as_base"] = (table.response == table.item.map(base)).astype(int)
        table.insert(0, "where", where)
        table["size"] = float(size)
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def recovery_summary(recovery: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Greedy accuracy per (where, strategy) with a bootstrap 95% CI over items, and the base-answer share."""
    rows = []
    for (where, strategy), group in recovery.groupby(["where", "strategy"], sort=False):
        low, high = bootstrap_ci(group.greedy.to_numpy(float), n_boot=n_boot, seed=seed)
        rows.append(
            dict(
                where=where, strategy=strategy, size=float(group["size"].iloc[0]), n=len(group),
                accuracy=float(group.greedy.mean()), ci_low=low, ci_high=high,
                same_as_base=float(group.same_as_base.mean()),
            )
        )  # fmt: skip
    return pd.DataFrame(rows)


def replay_cosines(
    pair: Any,
    items: Sequence[Any],
    variants: Sequence[str] = ("released", "paper"),
    alphas: Sequence[float] = (1000.0,),
    size: float = 2.0,
    fraction: float = 0.2,
    steps: int = 25,
    replay_layers: tuple[int, ...] = (0,),
    seed: int = 0,
) -> pd.DataFrame:
    """cosine(Δ, planted offset) of Activation Replay on a twin with a ``low`` plant at layer 0's input.

    Replay learns one offset Δ per visual token at its first layer; with the quantile mask of the
    plant's fraction it selects exactly the planted tokens. A Δ that undoes the plant points against
    it (cosine -1); an unrelated one is near 0.

    Returns:
        One row per (variant, alpha, item, visual token): ``planted`` (whether the token carries the
        plant), ``cosine``, and per item ``loss_ratio`` (final / first replay loss) and ``delta_ratio``
        (|Δ| / |plant| at that token).
    """
    rows = []
    with plant(pair, where="low", size=size, layer=0, fraction=fraction, seed=seed) as twin:
        for item in items:
            inputs = twin.encode(item.question, [item.image])
            planted = twin.plan(inputs)
            mark = torch.zeros(planted.candidates.numel(), dtype=torch.bool)
            mark[planted.candidate_index] = True
            for variant in variants:
                for alpha in alphas:
                    replay = ActivationReplay(
                        alpha=float(alpha), steps=steps, layers=replay_layers, rule="quantile",
                        quantile=fraction, variant=variant,
                    ).prepare(twin, inputs)  # fmt: skip
                    delta = replay.result.offsets.float().cpu()
                    offset = planted.offset.float().cpu().expand_as(delta)
                    cosine = F.cosine_similarity(delta, offset, dim=-1)
                    ratio = delta.norm(dim=-1) / offset.norm(dim=-1)
                    loss_ratio = replay.result.final_loss / replay.result.losses[0]
                    for t in range(delta.shape[0]):
                        rows.append(
                            dict(
                                variant=variant, alpha=float(alpha), item=str(item.id), token=t,
                                planted=bool(mark[t]), cosine=float(cosine[t]),
                                delta_ratio=float(ratio[t]), loss_ratio=float(loss_ratio), size=float(size),
                            )
                        )  # fmt: skip
    return pd.DataFrame(rows)


def cosine_summary(cosines: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean cosine per (variant, alpha, planted) with a 95% CI from a bootstrap over items."""
    rows = []
    for (variant, alpha, planted), group in cosines.groupby(["variant", "alpha", "planted"], sort=False):
        per_item = group.groupby("item").cosine.mean().to_numpy()
        low, high = bootstrap_ci(per_item, n_boot=n_boot, seed=seed)
        rows.append(
            dict(
                variant=variant, alpha=alpha, tokens="planted" if planted else "other", items=len(per_item),
                n_tokens=len(group), mean_cosine=float(group.cosine.mean()), ci_low=low, ci_high=high,
                min_cosine=float(group.cosine.min()), max_cosine=float(group.cosine.max()),
                delta_ratio=float(group.delta_ratio.mean()), loss_ratio=float(group.loss_ratio.mean()),
            )
        )  # fmt: skip
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> None:
    """Full-size curves: ``python -m analyses.controls --replicates 10 --items 12 --out runs/controls``."""
    parser = argparse.ArgumentParser(description="planted-twin controls at full size (organism)")
    parser.add_argument("--sizes", default="0,0.05,0.1,0.25,0.5,1,2")
    parser.add_argument("--wheres", default="low,high,random", help="plant locations of the power curve")
    parser.add_argument("--replicates", type=int, default=10)
    parser.add_argument("--items", type=int, default=12, help="items per replicate of the power curve")
    parser.add_argument("--recovery-items", type=int, default=120)
    parser.add_argument("--replay-items", type=int, default=20)
    parser.add_argument("--alphas", default="100,1000")
    parser.add_argument("--parts", default="power,recovery,replay")
    parser.add_argument("--out", default="runs/controls")
    args = parser.parse_args(argv)

    from lens import organism
    from lens.plot.controls import plot_detection_power, plot_injection_recovery, plot_replay_cosines
    from lens.plot.style import save_figure
    from lens.records import write_tables

    torch.set_num_threads(1)
    out = Path(args.out)
    pair = organism.load_pair()
    parts = set(args.parts.split(","))
    start = time.perf_counter()
    if "power" in parts:
        sizes = [float(s) for s in args.sizes.split(",")]
        detection = drift_detection(
            pair, organism.heldout(args.replicates * args.items), sizes, wheres=args.wheres.split(","),
            replicates=args.replicates, n_items=args.items,
        )  # fmt: skip
        power = detection_power(detection)
        write_tables(out, {"controls_detection": detection, "controls_power": power})
        save_figure(plot_detection_power(power), out / "06_power_curve")
        print(power.to_string(index=False), f"\npower: {time.perf_counter() - start:.0f} s", flush=True)
    if "recovery" in parts:
        recovery = injection_recovery(pair, organism.heldout(args.recovery_items))
        summary = recovery_summary(recovery)
        write_tables(out, {"controls_recovery": recovery, "controls_recovery_summary": summary})
        save_figure(plot_injection_recovery(summary), out / "06_injection_recovery")
        print(summary.to_string(index=False), f"\nrecovery: {time.perf_counter() - start:.0f} s", flush=True)
    if "replay" in parts:
        alphas = [float(a) for a in args.alphas.split(",")]
        cosines = replay_cosines(pair, organism.heldout(args.replay_items), alphas=alphas)
        summary = cosine_summary(cosines)
        write_tables(out, {"controls_replay_cosines": cosines, "controls_replay_summary": summary})
        save_figure(plot_replay_cosines(cosines), out / "06_replay_cosines")
        print(summary.to_string(index=False), f"\nreplay: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

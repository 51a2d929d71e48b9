"""Interventions on the RLVR model's prefill: hard base-to-RLVR injection and Activation Replay."""

from lens.interventions.base import Baseline, Generation, Intervention, PrefillEdit, Prepared, hook_count
from lens.interventions.injection import HardInjection, InjectionConfig
from lens.interventions.replay import ActivationReplay, ReplayConfig, ReplayResult

__all__ = [
    "ActivationReplay",
    "Baseline",
    "Generation",
    "HardInjection",
    "InjectionConfig",
    "Intervention",
    "PrefillEdit",
    "Prepared",
    "ReplayConfig",
    "ReplayResult",
    "hook_count",
]

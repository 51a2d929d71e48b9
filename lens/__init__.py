"""replay-lens: mechanistic interpretability for base/RLVR multimodal model pairs."""

from lens.adapters import ADAPTERS, ArchitectureAdapter, adapter_for
from lens.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    InputError,
    PairMismatchError,
    ReplayLensError,
    UnsupportedArchitectureError,
)
from lens.inputs import ROLES, PairInputs, build_inputs
from lens.loading import ModelPair, load_pair
from lens.logit_lens import LensConfig, LensResult, LogitLens, pair_lens

__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "InputError",
    "LensConfig",
    "LensResult",
    "LogitLens",
    "ModelPair",
    "PairInputs",
    "PairMismatchError",
    "ROLES",
    "ReplayLensError",
    "UnsupportedArchitectureError",
    "adapter_for",
    "build_inputs",
    "load_pair",
    "pair_lens",
]
__version__ = "0.1.0"

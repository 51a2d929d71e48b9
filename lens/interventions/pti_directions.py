"""PTI's steering directions: computed from contrast pairs, saved with safetensors, tied to their pair.

For every decoder layer and key/value head, PTI (Zhang et al., arXiv 2604.25642; released code
``huaiyi66/PTI``, ``cache_utils/cache_steer.py``) takes four directions from the KV cache of a
calibration set:

* **image keys / values**: the cache of the image tokens, averaged over the image tokens, for the
  object-only image minus the same for the background-only image (same prompt);
* **text keys / values**: the cache of the last prompt token for a prompt naming the objects minus
  the same for the caption with its object words removed (same original image).

The per-sample differences ``[N, heads·head_dim]`` of each layer are aggregated as PTI does: the
first principal component (a unit vector over all heads, its sign fixed as PTI's own PCA fixes it:
the sample with the largest absolute score scores positive) plus the mean difference; or the mean
alone (``aggregation="mean"``).

The directions are cache vectors as transformers 5 stores them (``DynamicCache.layers[l].keys`` /
``.values``, ``[batch, kv_heads, seq, head_dim]``; keys after the rotary embedding), read from a
plain forward with ``use_cache=True``. A file holds the four ``[layers, kv_heads, head_dim]`` float32
tensors; a JSON sidecar (``FILE.json`` beside ``FILE.safetensors``) names the pair's checkpoints by
content (:mod:`lens.fingerprint`), the model they were read from, the settings and a digest of the
tensor file. Loading them for another pair is refused, naming both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lens.errors import ConfigError, InputError, PairMismatchError
from lens.inputs import PairInputs

#: The four direction tensors, in file order: (site, cache part).
KINDS = (("image", "keys"), ("image", "values"), ("text", "keys"), ("text", "values"))
FORMAT = "replay-lens/pti-directions"
VERSION = 1
AGGREGATIONS = ("pca", "mean")


@dataclass(frozen=True)
class DirectionConfig:
    """How directions are read and aggregated.

    Attributes:
        aggregation: ``"pca"`` (PTI's recommended: first principal component + mean difference) or
            ``"mean"`` (the mean difference only).
        n_components: Principal components summed into the direction (PTI: 1; its DeepSeek text
            path uses 10).
        model: The model of the pair whose cache is read, and later steered (``"rlvr"``: PTI
            steers the model it calibrated on, and the twin is the model being decoded).
        text_position: The prompt position whose cache gives the text direction (PTI:
            ``"last_token"``, i.e. -1).
    """

    aggregation: str = "pca"
    n_components: int = 1
    model: str = "rlvr"
    text_position: int = -1

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"PTI aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.n_components < 1:
            raise ConfigError(f"PTI n_components must be >= 1, got {self.n_components}")
        if self.model not in ("rlvr", "base"):
            raise ConfigError(f"PTI directions come from 'rlvr' or 'base', got {self.model!r}")
        if self.text_position >= 0:
            raise ConfigError(
                f"PTI text_position counts from the prompt's end (< 0), got {self.text_position}"
            )


@dataclass(frozen=True, eq=False)
class PTIDirections:
    """The four ``[layers, kv_heads, head_dim]`` float32 directions and where they came from.

    Attributes:
        tensors: ``{"image.keys": ..., "image.values": ..., "text.keys": ..., "text.values": ...}``.
        checkpoints: The pair's checkpoint identities by role (:func:`lens.fingerprint.pair_fingerprint`).
        names: The pair's display names.
        config: The :class:`DirectionConfig` used.
        calibration: A description of the calibration set (source, seed, size).
    """

    tensors: dict[str, torch.Tensor]
    checkpoints: dict[str, Any]
    names: tuple[str, str]
    config: DirectionConfig = field(default_factory=DirectionConfig)
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        wanted = [f"{site}.{part}" for site, part in KINDS]
        if sorted(self.tensors) != sorted(wanted):
            raise ConfigError(f"PTI directions need tensors {wanted}, got {sorted(self.tensors)}")
        shapes = {tuple(t.shape) for t in self.tensors.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise ConfigError(
                f"PTI directions must all be [layers, kv_heads, head_dim], got {sorted(shapes)}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(layers, kv_heads, head_dim)``."""
        return tuple(self.tensors["image.keys"].shape)  # type: ignore[return-value]

    def direction(self, site: str, part: str) -> torch.Tensor:
        return self.tensors[f"{site}.{part}"]

    def digest(self) -> str:
        """A short digest of the tensors (part of the PTI setting, so records never mix directions)."""
        h = hashlib.sha256()
        for site, part in KINDS:
            h.update(self.direction(site, part).float().contiguous().numpy().tobytes())
        return h.hexdigest()[:10]

    # -- which pair ----------------------------------------------------------------------------
    def check_checkpoints(self, checkpoints: Mapping[str, Any], names: Sequence[str] = ()) -> None:
        """Refuse a pair whose checkpoints (by content, not folder) differ from the directions'.

        Raises:
            PairMismatchError: Naming the directions' pair and the given one.
        """
        check_same_pair(self.checkpoints, self.names, checkpoints, names)

    def check_pair(self, pair: Any) -> None:
        """:meth:`check_checkpoints` against a loaded pair."""
        from lens.fingerprint import pair_fingerprint

        self.check_checkpoints(pair_fingerprint(pair)["checkpoints"], getattr(pair, "names", ()))

    def check_model(self, n_layers: int, kv_heads: int, head_dim: int) -> None:
        """Refuse directions whose shape does not fit the model (``InputError``)."""
        if self.shape != (n_layers, kv_heads, head_dim):
            raise InputError(
                f"PTI directions of shape {self.shape} (layers, kv heads, head dim) do not fit a model "
                f"with {n_layers} layers, {kv_heads} key/value heads of {head_dim}"
            )

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors) and its JSON sidecar, each atomically; returns ``path``."""
        from safetensors.torch import save_file

        from lens.records import atomic_write

        path = check_path(path)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.tensors.items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "names": list(self.names),
            "checkpoints": self.checkpoints,
            "config": asdict(self.config),
            "calibration": self.calibration,
            "shape": list(self.shape),
            "tensors_sha256": _sha256(path),
        }
        atomic_write(sidecar(path), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> PTIDirections:
        """Read a directions file and its sidecar (:func:`read_meta` checks them first)."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_meta(path)
        tensors = load_file(str(path))
        return cls(
            tensors=tensors,
            checkpoints=meta["checkpoints"],
            names=tuple(meta.get("names", ("base", "rlvr"))),  # type: ignore[arg-type]
            config=DirectionConfig(**meta["config"]),
            calibration=meta.get("calibration", {}),
        )


def check_same_pair(
    stored: Mapping[str, Any],
    stored_names: Sequence[str],
    checkpoints: Mapping[str, Any],
    names: Sequence[str] = (),
) -> None:
    """Refuse checkpoints (compared by content, not folder) other than the ones directions were made on.

    Raises:
        PairMismatchError: Naming both pairs and what differs.
    """
    from lens.fingerprint import describe_changes

    changes = describe_changes({"checkpoints": dict(stored)}, {"checkpoints": dict(checkpoints)})
    if changes:
        theirs = " / ".join(_where(stored, stored_names))
        ours = " / ".join(_where(checkpoints, tuple(names) or ("base", "rlvr")))
        raise PairMismatchError(
            f"PTI directions were computed on the pair {theirs}, not on {ours} "
            f"({'; '.join(changes)}); compute them for this pair with `lens pti directions`"
        )


def check_path(path: str | Path) -> Path:
    """A directions file must be a ``.safetensors`` path (its sidecar is the same name in ``.json``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"PTI directions are a .safetensors file (with a .json sidecar), got {path}")
    return path


def sidecar(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def read_meta(path: str | Path) -> dict[str, Any]:
    """The sidecar of a directions file, after checking both files (no tensor is loaded).

    Raises:
        ConfigError: A missing file, a sidecar that is not ours, or a tensor file that is not the
            one the sidecar describes.
        CheckpointError: A truncated safetensors file.
    """
    from lens.fingerprint import check_safetensors

    path = check_path(path)
    side = sidecar(path)
    for p in (path, side):
        if not p.is_file():
            raise ConfigError(f"PTI directions file not found: {p} (make it with `lens pti directions`)")
    check_safetensors(path)
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{side}: not a PTI directions sidecar ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{side}: not a PTI directions sidecar (format {FORMAT!r} expected)")
    if meta.get("version") != VERSION:
        raise ConfigError(f"{side}: PTI directions version {meta.get('version')}, this lens reads {VERSION}")
    if meta.get("tensors_sha256") != _sha256(path):
        raise ConfigError(f"{path} is not the tensor file its sidecar {side.name} describes (digest differs)")
    return meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _where(checkpoints: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    out = []
    for role, name in zip(("base", "rlvr"), names, strict=False):
        path = (checkpoints.get(role) or {}).get("path")
        out.append(f"{name} ({path})" if path and path != name else str(name))
    return out


# -- computing them ----------------------------------------------------------------------------------


def cache_of(
    model: torch.nn.Module, model_inputs: Mapping[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One no-grad forward with a cache; per layer ``(keys, values)`` of row 0, ``[kv_heads, seq, head_dim]``."""
    with torch.no_grad():
        out = model(**model_inputs, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def _image_means(model: torch.nn.Module, inputs: PairInputs) -> tuple[torch.Tensor, torch.Tensor]:
    positions = inputs.visual_positions
    if positions.numel() == 0:
        raise InputError("a PTI calibration image gave no visual tokens")
    kv = cache_of(model, inputs.model_inputs)
    idx = positions.to(kv[0][0].device)
    keys = torch.stack([k[:, idx].float().mean(1) for k, _ in kv])
    values = torch.stack([v[:, idx].float().mean(1) for _, v in kv])
    return keys.cpu(), values.cpu()


def _token_state(
    model: torch.nn.Module, inputs: PairInputs, position: int
) -> tuple[torch.Tensor, torch.Tensor]:
    kv = cache_of(model, inputs.model_inputs)
    keys = torch.stack([k[:, position].float() for k, _ in kv])
    values = torch.stack([v[:, position].float() for _, v in kv])
    return keys.cpu(), values.cpu()


def aggregate(differences: torch.Tensor, config: DirectionConfig) -> torch.Tensor:
    """PTI's direction per layer from ``[N, layers, heads, dim]`` differences -> ``[layers, heads, dim]``.

    ``pca``: the sum of the first ``n_components`` principal components of the centred flattened
    differences (unit vectors, sign as PTI's PCA: the largest absolute score is positive) plus the
    mean difference. A component without variance (all differences equal, e.g. all zero) is
    dropped rather than added as an arbitrary unit vector, as an unguarded SVD would. Computed in
    float64, returned in float32.
    """
    n, layers, heads, dim = differences.shape
    x = differences.double().reshape(n, layers, heads * dim)
    mean = x.mean(0)
    if config.aggregation == "mean":
        return mean.reshape(layers, heads, dim).float()
    if n < 2:
        raise ConfigError("PTI's PCA aggregation needs at least 2 calibration items")
    out = []
    for layer in range(layers):
        z = x[:, layer] - mean[layer]
        u, singular, vh = torch.linalg.svd(z, full_matrices=False)
        k = min(config.n_components, vh.shape[0])
        rows = u[:, :k].abs().argmax(0)
        signs = torch.sign(u[rows, torch.arange(k)])
        signs[signs == 0] = 1.0
        # A component of (numerically) no variance is an arbitrary unit vector: it adds nothing.
        # (E.g. layer 0's text values: the same last token gives the same value in both prompts.)
        real = singular[:k] > 1e-6 * max(float(x[:, layer].norm()), 1e-30)
        out.append((vh[:k] * (signs * real)[:, None]).sum(0) + mean[layer])
    return torch.stack(out).reshape(layers, heads, dim).float()


def compute_directions(
    pair: Any,
    items: Sequence[Any],
    config: DirectionConfig = DirectionConfig(),
    calibration: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> PTIDirections:
    """PTI's four directions for ``pair`` from calibration items.

    Args:
        pair: The model pair (directions are read from ``config.model``).
        items: :class:`~lens.organism.calibration.CalibrationItem` s (or anything with the same
            fields): object-only and background-only images with a question; a positive and a
            negative text with the original image.
        config: How to read and aggregate.
        calibration: A description stored with the directions (source, seed, size).
        progress: Show a progress bar.

    Raises:
        ConfigError: Fewer than 2 items for ``pca``.
        InputError: An item whose two images give different numbers of visual tokens.
    """
    from tqdm.auto import tqdm

    from lens.fingerprint import pair_fingerprint
    from lens.prompts import encode_sample

    if config.aggregation == "pca" and len(items) < 2:
        raise ConfigError(f"PTI's PCA aggregation needs at least 2 calibration items, got {len(items)}")
    model = pair.rlvr if config.model == "rlvr" else pair.base
    diffs: dict[str, list[torch.Tensor]] = {f"{s}.{p}": [] for s, p in KINDS}
    for item in tqdm(items, desc="PTI directions", disable=not progress):
        obj = encode_sample(pair, _Prompt(item.question, (item.object_image,)))
        bg = encode_sample(pair, _Prompt(item.question, (item.background_image,)))
        if obj.visual_positions.numel() != bg.visual_positions.numel():
            raise InputError("a calibration item's object-only and background-only images differ in size")
        (ok, ov), (bk, bv) = _image_means(model, obj), _image_means(model, bg)
        diffs["image.keys"].append(ok - bk)
        diffs["image.values"].append(ov - bv)
        pos = encode_sample(pair, _Prompt(item.positive_text, (item.image,)))
        neg = encode_sample(pair, _Prompt(item.negative_text, (item.image,)))
        (pk, pv), (nk, nv) = (_token_state(model, x, config.text_position) for x in (pos, neg))
        diffs["text.keys"].append(pk - nk)
        diffs["text.values"].append(pv - nv)
    tensors = {key: aggregate(torch.stack(rows), config) for key, rows in diffs.items()}
    return PTIDirections(
        tensors=tensors,
        checkpoints=pair_fingerprint(pair)["checkpoints"],
        names=tuple(getattr(pair, "names", ("base", "rlvr"))),  # type: ignore[arg-type]
        config=config,
        calibration={"n": len(items), **(calibration or {})},
    )


@dataclass(frozen=True)
class _Prompt:
    """The fields :func:`lens.prompts.encode_sample` reads."""

    question: str
    images: tuple[Any, ...]

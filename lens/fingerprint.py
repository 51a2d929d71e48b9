"""What a run's records depend on, so a resume can tell when they no longer apply.

A *fingerprint* is a JSON-able dict stored beside the records:

* ``checkpoints``: one identity per model role (``base``, ``rlvr``, ...): a digest of the folder's
  ``config.json`` and, per weight file, its size and a digest of its bytes. Files up to
  :data:`WHOLE_FILE_LIMIT` are hashed whole (the organism, test models); larger ones by their size,
  their safetensors header and :data:`SAMPLED_BLOCKS` blocks spread over the file, about 1 MiB read
  per file, so a 7B checkpoint is identified in milliseconds. Names and sizes alone would miss a
  re-trained checkpoint of the same shape; modification times would refuse an identical copy.
* ``dtype`` and ``device``: the models' dtype and device type (``cpu``, ``cuda``, ...).

Per sample, :func:`sample_digest` hashes the inputs a record depends on (question, image bytes,
response, answer, options, hint), so a resume recomputes exactly the samples whose inputs changed.

Reading identities also validates safetensors files (:func:`check_safetensors`), so a truncated
``model.safetensors`` is refused before any weight is loaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lens.errors import CheckpointError

#: Weight files up to this size are hashed whole.
WHOLE_FILE_LIMIT = 64 * 2**20
#: Larger files: this many blocks of :data:`BLOCK_SIZE` bytes, evenly spread, plus the header.
SAMPLED_BLOCKS = 16
BLOCK_SIZE = 64 * 1024
#: What counts as a weight file in a checkpoint folder.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
#: Safetensors headers above this size are refused as corrupt (the format's own limit is 100 MB).
MAX_HEADER = 100_000_000


def check_safetensors(path: str | Path) -> int:
    """Check that a safetensors file is complete; return the length of its JSON header.

    The header lists every tensor's byte range; the file must end exactly where the last range ends.

    Raises:
        CheckpointError: A truncated file, a corrupt header, or trailing bytes.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})"
            )
        try:
            header = json.loads(fh.read(n))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    expected = 8 + n + end
    if expected != size:
        what = "truncated" if size < expected else "has trailing bytes"
        raise CheckpointError(
            f"{path}: safetensors file {what}: the header describes {expected} bytes, the file has {size}"
        )
    return n


def file_digest(path: str | Path) -> str:
    """Digest of a weight file: the whole content up to :data:`WHOLE_FILE_LIMIT`, else sampled blocks.

    Cached per (file, size, modification time) within the process: a command checks the checkpoint
    before loading it and the record writer again after, and that should cost one read.
    """
    path = Path(path).resolve()
    st = path.stat()
    return _file_digest(path, st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=256)
def _file_digest(path: Path, size: int, mtime_ns: int, inode: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
            return h.hexdigest()
        head = 0
        if path.suffix == ".safetensors":
            head = 8 + check_safetensors(path)
            h.update(fh.read(head))
        span = size - head - BLOCK_SIZE
        for i in range(SAMPLED_BLOCKS):
            fh.seek(head + span * i // (SAMPLED_BLOCKS - 1))
            h.update(fh.read(BLOCK_SIZE))
    return "sampled:" + h.hexdigest()


def _is_weight_file(path: Path) -> bool:
    return path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json"))


def checkpoint_identity(folder: str | Path) -> dict[str, Any]:
    """Identity of a checkpoint folder: its config digest and, per weight file, size and digest.

    Raises:
        CheckpointError: A truncated or corrupt safetensors file.
    """
    folder = Path(folder)
    config = folder / "config.json"
    identity: dict[str, Any] = {
        "path": str(folder.resolve()),
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "files": {},
    }
    for path in sorted(p for p in folder.iterdir() if _is_weight_file(p)):
        if path.suffix == ".safetensors":
            check_safetensors(path)
        identity["files"][path.name] = {"size": path.stat().st_size, "digest": file_digest(path)}
    return identity


def model_identity(model: Any) -> dict[str, Any]:
    """Identity of a loaded model: its checkpoint folder's, or a digest of its weights when it has none."""
    source = str(getattr(model, "name_or_path", "") or "")
    if source and Path(source).is_dir():
        return checkpoint_identity(source)
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    weights = {"<in memory>": {"size": None, "digest": h.hexdigest()}}
    return {"path": source or None, "config": None, "files": weights}


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def fingerprint(checkpoints: Mapping[str, Mapping[str, Any]], dtype: Any, device: Any) -> dict[str, Any]:
    """Assemble a fingerprint from checkpoint identities (by role), a dtype and a device."""
    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    return {"checkpoints": dict(checkpoints), "dtype": dtype_name(dtype), "device": device_type}


def models_fingerprint(models: Mapping[str, Any]) -> dict[str, Any]:
    """Fingerprint of loaded models by role, e.g. ``{"base": m0, "rlvr": m1}``."""
    first = next(iter(models.values()))
    param = next(first.parameters())
    return fingerprint({role: model_identity(m) for role, m in models.items()}, param.dtype, param.device)


def pair_fingerprint(pair: Any) -> dict[str, Any]:
    """Fingerprint of a :class:`lens.ModelPair`: both checkpoints, the dtype, the device type and the
    settings of the image processor both models are fed through (they decide the visual tokens)."""
    found = models_fingerprint({"base": pair.base, "rlvr": pair.rlvr})
    processor = getattr(pair, "image_processor", None)
    if processor is not None:
        from lens.loading import image_processor_settings

        found["image_processor"] = json.loads(json.dumps(image_processor_settings(processor), default=str))
    return found


def without_paths(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint minus the checkpoints' folder paths: what must match for records to be reused."""
    out = dict(fingerprint)
    out["checkpoints"] = {
        role: {k: v for k, v in identity.items() if k != "path"}
        for role, identity in fingerprint.get("checkpoints", {}).items()
    }
    return out


def _file_changes(role: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    changes = []
    if old.get("config") != new.get("config"):
        changes.append(f"{role} checkpoint changed: config.json differs")
    old_files, new_files = old.get("files", {}), new.get("files", {})
    for name in sorted(set(old_files) | set(new_files)):
        a, b = old_files.get(name), new_files.get(name)
        if a is None:
            changes.append(f"{role} checkpoint changed: {name} is new")
        elif b is None:
            changes.append(f"{role} checkpoint changed: {name} is gone")
        elif a.get("size") != b.get("size"):
            changes.append(
                f"{role} checkpoint changed: {name} size {a.get('size'):,} -> {b.get('size'):,} bytes"
            )
        elif a.get("digest") != b.get("digest"):
            changes.append(f"{role} checkpoint changed: {name} content differs")
    return changes


def describe_changes(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, one phrase per difference (empty when they agree).

    Checkpoints are compared by content, not by folder: a moved or copied checkpoint is the same one.
    """
    changes: list[str] = []
    old, new = stored.get("checkpoints", {}), wanted.get("checkpoints", {})
    for role in sorted(set(old) | set(new)):
        if role not in old or role not in new:
            changes.append(f"{role} checkpoint {'added' if role in new else 'removed'}")
            continue
        found = _file_changes(role, old[role], new[role])
        if found and old[role].get("path") != new[role].get("path"):
            found[0] += f" ({old[role].get('path')} -> {new[role].get('path')})"
        changes += found
    for key, label in (("dtype", "dtype"), ("device", "device type")):
        if stored.get(key) != wanted.get(key):
            changes.append(f"{label} changed: {stored.get(key)} -> {wanted.get(key)}")
    # Compared only when both have it: fingerprints stored before it was recorded still resume.
    old_ip, new_ip = stored.get("image_processor"), wanted.get("image_processor")
    if old_ip is not None and new_ip is not None and old_ip != new_ip:
        keys = sorted(k for k in set(old_ip) | set(new_ip) if old_ip.get(k) != new_ip.get(k))
        shown = ", ".join(f"{k} {old_ip.get(k)!r} -> {new_ip.get(k)!r}" for k in keys[:3])
        changes.append(f"image processor changed: {shown}")
    return changes


def _image_bytes(image: Any) -> bytes:
    if image is None:
        return b""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if hasattr(image, "tobytes") and hasattr(image, "mode"):  # a PIL image
        return f"{image.mode}:{image.size}:".encode() + image.tobytes()
    return repr(image).encode()


#: Sample fields that enter the digest (whichever exist). ``answer`` counts: correctness is recorded.
DIGEST_FIELDS = ("question", "response", "answer", "options", "hint")


def sample_digest(sample: Any) -> str:
    """Digest of what a sample's records depend on: its text fields and its images' bytes."""
    from lens.datasets import sample_images

    h = hashlib.sha256()
    text = {field: getattr(sample, field, None) for field in DIGEST_FIELDS}
    h.update(json.dumps(text, sort_keys=True, default=str).encode())
    for image in sample_images(sample):
        data = _image_bytes(image)
        h.update(struct.pack("<Q", len(data)))
        h.update(data)
    video = getattr(sample, "video", None)
    if video is not None:  # only video items: the digests of other samples stay as they were
        h.update(b"video:" + repr(getattr(sample, "video_options", None)).encode())
        frames = getattr(video, "frames", None)
        if frames is not None:  # an in-memory lens.video.VideoClip: its frames and timing, not a file
            h.update(repr((frames.shape, str(frames.dtype), video.indices, video.total_frames)).encode())
            h.update(repr((video.video_fps, video.options)).encode() + frames.tobytes())
        else:
            with open(video, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:32]


def sample_digests(samples: Iterable[Any]) -> dict[str, str]:
    """``{sample id: digest}`` of every sample."""
    return {str(s.id): sample_digest(s) for s in samples}

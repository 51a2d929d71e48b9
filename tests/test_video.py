"""Video inputs: PyAV reading and Qwen sampling, the Qwen-VL video builder against the stock processor,
roles and frame indices, bad input before any weight loads, and drift / injection / replay on video."""

from __future__ import annotations

import enum
import importlib
import json
import sys
import types

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPT, RESPONSE, write_dataset
from intervention_fixtures import same_weights, tiny_pair, weights
from reference_replay import reference_replay

from lens.datasets import Sample, check_images, load_jsonl
from lens.errors import DatasetError, InputError
from lens.inputs import ROLE_VISUAL
from lens.interventions import ActivationReplay, HardInjection, hook_count
from lens.video import VideoClip, VideoOptions, VideoPart, read_video, sample_indices

N_FRAMES, HEIGHT, WIDTH, FPS = 6, 42, 70, 4


def write_video(path, frames: np.ndarray, fps: int = FPS) -> None:
    """A lossless video (FFV1, RGB): decoding gives back exactly ``frames``."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (N_FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory, frames):
    path = tmp_path_factory.mktemp("video") / "clip.mkv"
    write_video(path, frames)
    return path


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def video_inputs(pair, video_path):
    return pair.encode(PROMPT, videos=[VideoPart(video_path, VideoOptions(nframes=4))])


# -- reading and sampling ----------------------------------------------------------------------------


def test_read_video_samples_uniformly_like_qwen_vl_utils(video_path, frames):
    clip = read_video(video_path, VideoOptions(nframes=4))
    # linspace(0, 5, 4).round() = 0, 1.67, 3.33, 5 -> 0, 2, 3, 5
    assert clip.indices == (0, 2, 3, 5)
    assert clip.total_frames == N_FRAMES and clip.video_fps == FPS
    assert np.array_equal(clip.frames, frames[[0, 2, 3, 5]])  # lossless: PyAV decodes what was written
    assert clip.sampled_fps == pytest.approx(4 / 6 * 4)
    # fps-based: 6 frames at 4 fps is 1.5 s; 2 fps gives 3 frames, raised to the minimum of 4.
    assert read_video(video_path, VideoOptions(fps=2.0)).indices == (0, 2, 3, 5)
    assert sample_indices(100, 25.0, VideoOptions(fps=2.0)) == tuple(
        int(i) for i in np.rint(np.linspace(0, 99, 8))
    )
    assert sample_indices(100, 25.0, VideoOptions(nframes=5)) == sample_indices(
        100, 25.0, VideoOptions(nframes=4)
    )
    with pytest.raises(InputError, match="cannot sample 8 frames from a video of 6"):
        read_video(video_path, VideoOptions(nframes=8))


# -- the builder against the stock processor -------------------------------------------------------


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


def _torchvision_stand_in() -> types.ModuleType:
    """``torchvision.transforms.v2.functional``, restated for the three calls the stock video
    processor makes, from torchvision 0.29's source: ``resize`` of a uint8 tensor on the CPU with
    bicubic interpolation is ``interpolate(..., antialias=True, align_corners=False)`` on the uint8
    tensor itself (``_geometry.resize_image``), a no-op at the same size; ``normalize`` is
    ``(x - mean) / std`` in the image dtype (``_misc.normalize_image``)."""

    def resize(image, size, interpolation=_InterpolationMode.BILINEAR, antialias=True, **_):
        *lead, c, h, w = image.shape
        if tuple(size) == (h, w):
            return image
        out = F.interpolate(
            image.reshape(-1, c, h, w),
            size=list(size),
            mode=interpolation.value,
            align_corners=False,
            antialias=antialias,
        )
        return out.reshape(*lead, c, *size)

    def normalize(image, mean, std, inplace=False):
        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)

    functional = types.ModuleType("torchvision.transforms.v2.functional")
    functional.InterpolationMode = _InterpolationMode
    functional.resize, functional.normalize = resize, normalize
    functional.grayscale_to_rgb = lambda image: image
    return functional


@pytest.fixture
def stock_processor(monkeypatch, pair):
    """The stock ``Qwen2_5_VLProcessor`` with the stock ``Qwen2VLVideoProcessor``, made buildable
    without torchvision by standing in for the torchvision functions it calls (test only)."""
    import transformers.image_processing_backends as backends
    import transformers.video_processing_utils as video_utils
    from transformers import Qwen2_5_VLProcessor
    from transformers.image_utils import PILImageResampling

    functional = _torchvision_stand_in()
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2")
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(sys.modules["torchvision.transforms"], "v2", sys.modules[names[2]], raising=False)
    monkeypatch.setattr(sys.modules["torchvision"], "transforms", sys.modules[names[1]], raising=False)
    monkeypatch.setattr(sys.modules[names[2]], "functional", functional, raising=False)
    monkeypatch.setitem(sys.modules, "torchvision.transforms.v2.functional", functional)
    monkeypatch.setattr(backends, "tvF", functional, raising=False)
    monkeypatch.setattr(video_utils, "tvF", functional, raising=False)
    monkeypatch.setattr(
        backends,
        "pil_torch_interpolation_mapping",
        {PILImageResampling.BICUBIC: _InterpolationMode.BICUBIC},
        raising=False,
    )
    module_name = "transformers.models.qwen2_vl.video_processing_qwen2_vl"
    module = importlib.import_module(module_name)
    ip = pair.image_processor
    video_processor = module.Qwen2VLVideoProcessor(
        patch_size=ip.patch_size,
        merge_size=ip.merge_size,
        temporal_patch_size=ip.temporal_patch_size,
        size={"shortest_edge": ip.size.shortest_edge, "longest_edge": ip.size.longest_edge},
    )

    class Processor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    yield Processor(image_processor=ip, tokenizer=pair.tokenizer, video_processor=video_processor)
    sys.modules.pop(module_name, None)  # it holds the stand-in; later imports must not see it


@pytest.mark.parametrize("max_pixels", [None, 28 * 28])  # resized up (42x70 -> 56x56) and down (28x28)
def test_video_inputs_equal_stock_processor(pair, stock_processor, video_path, max_pixels):
    from transformers.video_utils import VideoMetadata

    clip = read_video(video_path, VideoOptions(nframes=4))
    ours = pair.encode(
        PROMPT, videos=[VideoPart(clip, VideoOptions(max_pixels=max_pixels))], response=RESPONSE
    ).model_inputs
    if max_pixels:
        stock_processor.video_processor.size = {"shortest_edge": 28 * 28, "longest_edge": max_pixels}
    tok = pair.tokenizer
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    meta = VideoMetadata(
        total_num_frames=clip.total_frames, fps=clip.video_fps, frames_indices=list(clip.indices)
    )
    expected = stock_processor(
        text=[text + RESPONSE + tok.eos_token],
        videos=[clip.frames],  # the same decoded frames: the equality is about the processing
        video_metadata=[meta],
        cap_pixels_per_frame=False,
        return_tensors="pt",
    )
    expected = {k: v for k, v in expected.items() if k != "video_metadata"}
    assert set(ours) == set(expected)
    for key, value in expected.items():
        value = torch.as_tensor(value)
        assert ours[key].dtype == value.dtype, key
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key
    assert (ours["mm_token_type_ids"] == 2).sum() == ours["video_grid_thw"].prod() // 4


def test_video_roles_frames_and_time_positions(pair, video_inputs):
    inputs = video_inputs
    grid = inputs.video_grids
    assert grid == ((2, 4, 4),)  # 42x70 -> 56x56 px (70/28 rounds to 2): 4x4 patches; 4 frames -> 2 temporal
    per_frame = 4 * 4 // 4
    video_id = pair.config.video_token_id
    positions = inputs.visual_positions
    assert positions.numel() == 2 * per_frame
    assert (inputs.input_ids[0, positions] == video_id).all()
    assert (
        inputs.tokens[positions[0] - 1] == "<|vision_start|>"
        and inputs.tokens[positions[-1] + 1] == "<|vision_end|>"
    )
    assert [inputs.frames[p] for p in positions.tolist()] == [0] * per_frame + [1] * per_frame
    assert sum(f >= 0 for f in inputs.frames) == positions.numel() and len(inputs.frames) == inputs.n_tokens
    assert inputs.model_inputs["mm_token_type_ids"][0].tolist() == [
        2 if r == ROLE_VISUAL else 0 for r in inputs.roles
    ]
    assert inputs.to("cpu").frames == inputs.frames
    # The mRoPE time positions use second_per_grid_ts: changing it changes the RLVR's logits.
    with torch.no_grad():
        plain = pair.rlvr(**inputs.model_inputs).logits
        slower = dict(inputs.model_inputs, second_per_grid_ts=inputs.model_inputs["second_per_grid_ts"] * 4)
        assert not torch.allclose(pair.rlvr(**slower).logits, plain)


# -- bad input --------------------------------------------------------------------------------------


def test_bad_video_items_fail_with_file_and_line(tmp_path, video_path):
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all" * 20)
    with av.open(str(tmp_path / "empty.mkv"), "w") as container:  # a header and no frame
        stream = container.add_stream("ffv1", rate=4)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "bgr0"
        container.start_encoding()
    cases = [
        ({"video": "garbage.mp4"}, "unreadable video"),
        ({"video": "empty.mkv"}, "empty video"),
        ({"video": "missing.mp4"}, "video not found"),
        ({"video": str(video_path), "nframes": 1}, "'nframes' must be an integer >= 2"),
        ({"video": str(video_path), "nframes": 8}, "cannot sample 8 frames"),
        ({"video": str(video_path), "nframes": 4, "fps": 2}, "not both"),
        ({"nframes": 4}, "without a 'video'"),
    ]
    for row, message in cases:
        path = write_dataset(
            tmp_path, [{"id": "a", "question": PROMPT}, {"id": "b", "question": PROMPT, **row}]
        )
        with pytest.raises(DatasetError, match=f"data.jsonl:2: .*{message}"):
            load_jsonl(path)


def test_video_jsonl_reads_options_and_checks_before_loading(tmp_path, video_path):
    row = {"id": "v", "question": PROMPT, "video": str(video_path), "nframes": 4, "max_pixels": 200704}
    (sample,) = load_jsonl(write_dataset(tmp_path, [row]))
    assert sample.video == video_path and sample.video_options == VideoOptions(nframes=4, max_pixels=200704)
    assert "nframes" not in sample.meta and "video" not in sample.meta
    check_images([sample])  # the pre-load check of every command
    with pytest.raises(InputError, match="sample 'w': cannot sample 8 frames"):
        check_images(
            [Sample(id="w", question=PROMPT, video=video_path, video_options=VideoOptions(nframes=8))]
        )


def test_video_for_text_only_pair_refused_before_weights(tmp_path, video_path, lm_dirs, capsys):
    from lens.cli import main

    data = write_dataset(tmp_path, [{"id": "v", "question": PROMPT, "video": str(video_path), "nframes": 4}])
    out = tmp_path / "out"
    code = main(
        [
            "drift",
            "--base",
            str(lm_dirs[0]),
            "--rlvr",
            str(lm_dirs[1]),
            "--data",
            str(data),
            "--out",
            str(out),
        ]
    )
    assert code == 2
    assert "has a video, but decoder-only causal LM" in capsys.readouterr().err
    assert not out.exists()


# -- analyses and interventions on video tokens ---------------------------------------------------


def test_drift_on_a_video_item(pair, video_path):
    from analyses.kl_drift import run_drift

    sample = Sample(
        id="v", question=PROMPT, response=RESPONSE, video=video_path, video_options=VideoOptions(nframes=4)
    )
    result = run_drift(pair, [sample])
    visual = result.buckets[result.buckets["token_group"] == "visual"]
    assert len(visual) > 0 and (visual["n"] > 0).any() if "n" in visual else len(visual) > 0


def test_hard_injection_on_video_tokens(pair, video_inputs):
    saved = weights(pair.rlvr)
    inj = HardInjection(layers=(0, 1), rule="quantile", quantile=0.5).prepare(pair, video_inputs)
    video = set(video_inputs.visual_positions.tolist())
    assert inj.plan.positions and all(set(p.tolist()) <= video for p in inj.plan.positions.values())
    with torch.no_grad():
        plain = pair.rlvr(**video_inputs.model_inputs).logits
        with inj.applied(pair) as model:
            edited = model(**video_inputs.model_inputs).logits
    assert not torch.allclose(edited, plain)
    assert inj.generate(pair, video_inputs, max_new_tokens=4).texts
    assert same_weights(pair.rlvr, saved) and hook_count(pair.rlvr) == 0


def test_replay_on_video_tokens_equals_reference(pair, video_inputs):
    settings = {"rule": "quantile", "quantile": 0.3, "alpha": 10.0, "steps": 4, "layers": (0, 1, 2)}
    fast = ActivationReplay(**settings).prepare(pair, video_inputs).result
    ref_offsets, ref_losses = reference_replay(pair, video_inputs, **settings)
    assert fast.losses[0] > 0
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(ref_losses), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(fast.offsets, ref_offsets, rtol=1e-4, atol=1e-5)
    assert fast.offsets.shape[0] == video_inputs.visual_positions.numel()


def test_video_clip_given_directly_and_json_roundtrip(pair, video_path):
    clip = read_video(video_path, VideoOptions(nframes=4))
    a = pair.encode(PROMPT, videos=[clip])
    b = pair.encode(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": str(video_path), "nframes": 4},
                    {"type": "text", "text": PROMPT},
                ],
            }
        ]
    )
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.model_inputs["pixel_values_videos"], b.model_inputs["pixel_values_videos"])
    assert isinstance(clip, VideoClip) and json.dumps(list(clip.indices))


# -- the run's video flags ------------------------------------------------------------------------


def test_run_video_flags_fill_item_options_and_are_checked_before_loading(
    tmp_path, video_path, vl_dirs, capsys, monkeypatch
):
    import json

    import lens.loading
    from lens.cli import main

    data = write_dataset(tmp_path, [{"id": "v", "question": PROMPT, "video": str(video_path)}])
    pair_args = ["--base", str(vl_dirs[0]), "--rlvr", str(vl_dirs[1]), "--data", str(data), "--threads", "1"]
    real_load = lens.loading.load_pair
    monkeypatch.setattr(lens.loading, "load_pair", lambda *a, **k: pytest.fail("loaded weights"))
    for flags, fragment in (
        (["--nframes", "1"], "--nframes must be an integer >= 2"),
        (["--nframes", "4", "--fps", "1"], "--nframes or its --fps, not both"),
        (["--nframes", "64"], "sample 'v'"),
    ):
        out = tmp_path / "refused"
        assert main(["drift", *pair_args, *flags, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
        assert not out.exists()
    monkeypatch.setattr(lens.loading, "load_pair", real_load)
    counts = {}
    for nframes in (2, 4):
        out = tmp_path / f"n{nframes}"
        assert main(["drift", *pair_args, "--nframes", str(nframes), "--layers", "0", "--out", str(out)]) == 0
        (record,) = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
        counts[nframes] = sum(stop - start for start, stop in record["visual"])
    # Two frames make one temporal patch, four make two: twice the video tokens.
    assert counts[4] == 2 * counts[2] > 0


def test_heatmap_marks_where_each_frame_starts(pair, video_path, tmp_path):
    from analyses.kl_drift import run_drift
    from lens.plot.heatmaps import frame_boundaries, plot_layer_token_heatmaps

    assert frame_boundaries([-1, 0, 0, 1, 1, -1, 2]) == [3, 6]
    sample = Sample(id="v", question=PROMPT, video=video_path, video_options=VideoOptions(nframes=6))
    inputs = pair.encode(PROMPT, videos=[VideoPart(video_path, VideoOptions(nframes=6))])
    boundaries = frame_boundaries(inputs.frames)
    assert len(boundaries) == 2  # six frames: three temporal patches
    table = run_drift(pair, [sample]).table
    fig = plot_layer_token_heatmaps(table, frames=inputs.frames)
    fig.savefig(tmp_path / "heatmap.png")
    dashed = [line for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert sorted({line.get_xdata()[0] + 0.5 for line in dashed}) == boundaries

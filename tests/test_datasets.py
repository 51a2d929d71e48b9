"""Dataset readers: the same organism items through JSONL, VLMEvalKit TSV, Parquet and a
``datasets.save_to_disk`` folder give identical model inputs; multi-image rows, image reuse by index,
options and hints, column mapping; every bad input is one DatasetError naming the file and row."""

from __future__ import annotations

import base64
import json
import string
from io import BytesIO, StringIO
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lens import load_pair, organism
from lens.datasets import (
    Sample,
    check_images,
    dataset_format,
    load_dataset,
    load_jsonl,
    parse_columns,
    sample_images,
)
from lens.errors import ConfigError, DatasetError, InputError
from lens.inputs import open_image

datasets = pytest.importorskip("datasets")  # the `test` extra installs it; the readers do not need it

N_ITEMS = 6


def png(image: Image.Image) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_tsv(path, rows: list[dict]) -> None:
    """The way VLMEvalKit writes its TSVs: ``DataFrame.to_csv(sep="\\t", index=False)``."""
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False, encoding="utf-8")


@pytest.fixture(scope="module")
def items():
    return organism.heldout(N_ITEMS)


@pytest.fixture(scope="module")
def pair():
    return load_pair("organism")


@pytest.fixture(scope="module")
def sources(items, tmp_path_factory):
    """The same organism items written in each format (lossless PNG images everywhere)."""
    root = tmp_path_factory.mktemp("sources")
    jsonl = root / "jsonl"
    (jsonl / "images").mkdir(parents=True)
    with open(jsonl / "data.jsonl", "w") as fh:
        for s in items:
            s.image.save(jsonl / "images" / f"{s.id}.png")
            row = {"id": s.id, "question": s.question, "image": f"images/{s.id}.png", "answer": s.answer}
            fh.write(json.dumps({**row, "qtype": s.qtype}) + "\n")
    tsv = root / "bench.tsv"
    write_tsv(
        tsv,
        [
            {
                "index": s.id,
                "image": b64(png(s.image)),
                "question": s.question,
                "answer": s.answer,
                "category": s.qtype,
            }
            for s in items
        ],
    )
    table = pa.table(
        {
            "id": [s.id for s in items],
            "question": [s.question for s in items],
            "image": [png(s.image) for s in items],
            "answer": [s.answer for s in items],
            "qtype": [s.qtype for s in items],
        }
    )
    parquet = root / "bench.parquet"
    pq.write_table(table, parquet)
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "image": datasets.Image(),
            "answer": datasets.Value("string"),
            "qtype": datasets.Value("string"),
        }
    )
    hf = datasets.Dataset.from_dict(
        {
            "id": [s.id for s in items],
            "question": [s.question for s in items],
            "image": [s.image for s in items],
            "answer": [s.answer for s in items],
            "qtype": [s.qtype for s in items],
        },
        features=features,
    )
    saved = root / "saved"
    hf.save_to_disk(str(saved))
    return {"jsonl": jsonl, "tsv": tsv, "parquet": parquet, "save_to_disk": saved}


# -- the same items through every reader -------------------------------------------------------------


def test_every_reader_gives_identical_inputs(items, pair, sources):
    loaded = {kind: load_dataset(path) for kind, path in sources.items()}
    assert {kind: dataset_format(path) for kind, path in sources.items()} == {k: k for k in sources}
    reference = [pair.encode(s.question, [s.image]) for s in items]
    for kind, samples in loaded.items():
        assert [s.id for s in samples] == [s.id for s in items], kind
        assert [(s.question, s.answer, s.qtype) for s in samples] == [
            (s.question, s.answer, s.qtype) for s in items
        ]
        for sample, ref in zip(samples, reference, strict=True):
            assert len(sample.images) == 1 and sample.image is sample.images[0]
            assert isinstance(sample.image, Path if kind == "jsonl" else bytes)
            mine = pair.encode(sample.question, sample.images)
            assert mine.roles == ref.roles, kind
            assert mine.model_inputs.keys() == ref.model_inputs.keys()
            for key, value in ref.model_inputs.items():
                assert torch.equal(mine.model_inputs[key], value), (kind, sample.id, key)
    assert all(s.image.is_absolute() for s in loaded["jsonl"])
    assert loaded["tsv"][0].meta == {} and loaded["parquet"][0].meta == {}
    check_images(s for samples in loaded.values() for s in samples)


def test_open_image_reads_bytes_like_a_file(items, sources):
    from_file = open_image(sources["jsonl"] / "images" / f"{items[0].id}.png")
    from_bytes = open_image(png(items[0].image))
    assert (
        from_bytes.mode == "RGB" and from_bytes.tobytes() == from_file.tobytes() == items[0].image.tobytes()
    )
    with pytest.raises(InputError, match=r"corrupt image \(9 bytes\)"):
        open_image(b"not a png")


# -- VLMEvalKit TSV: images by index, lists of images, image_path, options, hint -----------------------


def test_tsv_index_reuse_lists_paths_and_line_numbers(items, pair, tmp_path):
    images = [png(s.image) for s in items[:3]]
    Image.open(BytesIO(images[2])).save(tmp_path / "side.png")
    rows = [
        {"index": 10, "image": b64(images[0]), "question": "first\nspans two lines", "image_path": None},
        {"index": 11, "image": "10", "question": "reuses row 10's image", "image_path": None},
        {
            "index": 12,
            "image": str([b64(images[0]), b64(images[1])]),
            "question": "two images",
            "image_path": None,
        },
        {"index": 13, "image": None, "question": "from image_path", "image_path": "side.png"},
        {"index": 14, "image": None, "question": "text only", "image_path": None},
        {"index": 15, "image": "12", "question": "reuses a two-image row", "image_path": None},
    ]
    write_tsv(tmp_path / "b.tsv", rows)
    samples = load_dataset(tmp_path / "b.tsv")
    by_id = {s.id: s for s in samples}
    assert list(by_id) == ["10", "11", "12", "13", "14", "15"]
    assert by_id["10"].images == (images[0],) and by_id["10"].question == "first\nspans two lines"
    assert by_id["11"].images[0] is by_id["10"].images[0]  # decoded once, shared
    assert by_id["12"].images == (images[0], images[1])
    assert by_id["15"].images == by_id["12"].images
    assert by_id["13"].images == ((tmp_path / "side.png").resolve(),)
    assert by_id["14"].images == () and by_id["14"].image is None
    two = pair.encode(by_id["12"].question, by_id["12"].images)
    assert len(two.image_grids) == 2
    ref = pair.encode(by_id["12"].question, [items[0].image, items[1].image])
    assert all(torch.equal(two.model_inputs[k], v) for k, v in ref.model_inputs.items())
    # Row 13 starts on line 6: the header is line 1 and row 10's question spans lines 2-3.
    (tmp_path / "side.png").unlink()
    with pytest.raises(DatasetError, match=r"b\.tsv:6: image not found"):
        load_dataset(tmp_path / "b.tsv")


def test_tsv_options_and_hint_follow_vlmevalkit(tmp_path):
    rows = [
        {
            "index": 1,
            "question": "q1",
            "hint": "look left",
            "A": "red",
            "B": "blue",
            "C": None,
            "D": None,
            "answer": "A",
        },
        {"index": 2, "question": "q2", "hint": None, "A": "1", "B": "2", "C": "3", "D": "4", "answer": "C"},
        {
            "index": 3,
            "question": "q3",
            "hint": "NA",
            "A": "x",
            "B": "NaN",
            "C": "z",
            "D": None,
            "answer": "C",
        },
        {
            "index": 4,
            "question": "open question",
            "hint": None,
            "A": None,
            "B": None,
            "C": None,
            "D": None,
            "answer": "7",
        },
    ]
    for row in rows:
        row["image"] = None
        row["l2-category"] = "counting"
    write_tsv(tmp_path / "mcq.tsv", rows)
    samples = load_dataset(tmp_path / "mcq.tsv")
    assert [s.options for s in samples] == [
        (("A", "red"), ("B", "blue")),
        (("A", "1"), ("B", "2"), ("C", "3"), ("D", "4")),
        (("A", "x"), ("C", "z")),
        (),
    ]
    assert [s.hint for s in samples] == ["look left", None, None, None]
    assert samples[0].meta == {"l2-category": "counting"}
    # The same rule as VLMEvalKit's prompt builders, run on its own pandas reading of the file.
    frame = pd.read_csv(tmp_path / "mcq.tsv", sep="\t")
    for sample, (_, line) in zip(samples, frame.iterrows(), strict=True):
        options = {c: line[c] for c in string.ascii_uppercase if c in line and not pd.isna(line[c])}
        assert [k for k, _ in sample.options] == list(options)
        assert (sample.hint is None) == pd.isna(line["hint"])


# -- Parquet and save_to_disk: image cells, lists, structs, options, column mapping ---------------------


def test_parquet_image_cells_lists_and_options(items, pair, tmp_path):
    images = [png(s.image) for s in items[:3]]
    (tmp_path / "imgs").mkdir()
    Image.open(BytesIO(images[2])).save(tmp_path / "imgs" / "c.png")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "id": pa.array([0, 1, 2], pa.int64()),
            "question": ["one", "two", "three"],
            "images": pa.array(
                [
                    [{"bytes": images[0], "path": "ignored.png"}],
                    [{"bytes": images[0], "path": None}, {"bytes": None, "path": "imgs/c.png"}],
                    [],
                ],
                pa.list_(struct),
            ),
            "options": [["3", "5"], [], ["a", "b", "c"]],
            "answer": ["B", "12", "A"],
            "source": ["s1", "s2", "s3"],
        }
    )
    pq.write_table(table, tmp_path / "x.parquet")
    samples = load_dataset(tmp_path / "x.parquet")
    assert [s.id for s in samples] == ["0", "1", "2"]
    assert samples[0].images == (images[0],)
    assert samples[1].images == (images[0], (tmp_path / "imgs" / "c.png").resolve())
    assert samples[2].images == ()
    assert [s.options for s in samples] == [
        (("A", "3"), ("B", "5")),
        (),
        (("A", "a"), ("B", "b"), ("C", "c")),
    ]
    assert samples[0].meta == {"source": "s1"}
    mine = pair.encode("two", samples[1].images)
    ref = pair.encode("two", [items[0].image, items[2].image])
    assert all(torch.equal(mine.model_inputs[k], v) for k, v in ref.model_inputs.items())


def test_column_mapping_for_every_reader(items, pair, tmp_path):
    """A MathVista-like Hugging Face layout: ``image`` is a path string, ``decoded_image`` the Image struct."""
    mapping = parse_columns("id=pid, question=query,answer=gt,image=decoded_image")
    table = pa.table(
        {
            "pid": ["a", "b"],
            "query": [items[0].question, items[1].question],
            "gt": ["1", "2"],
            "image": ["images/1.jpg", "images/2.jpg"],
            "decoded_image": [{"bytes": png(s.image), "path": None} for s in items[:2]],
        }
    )
    (tmp_path / "pq").mkdir()
    pq.write_table(table.slice(0, 1), tmp_path / "pq" / "testmini-00000.parquet")
    pq.write_table(table.slice(1, 1), tmp_path / "pq" / "testmini-00001.parquet")
    samples = load_dataset(tmp_path / "pq", columns=mapping)  # a folder of Parquet files, in name order
    assert [(s.id, s.question, s.answer) for s in samples] == [
        ("a", items[0].question, "1"),
        ("b", items[1].question, "2"),
    ]
    assert samples[0].meta == {"image": "images/1.jpg"}
    assert samples[1].images == (png(items[1].image),)
    with pytest.raises(DatasetError, match=r"'image': .*images/1\.jpg"):
        load_dataset(
            tmp_path / "pq", columns={"id": "pid", "question": "query"}
        )  # the path column is not found
    write_tsv(
        tmp_path / "m.tsv", [{"qid": "t1", "query": "how many red shapes ?", "img": b64(png(items[0].image))}]
    )
    (sample,) = load_dataset(tmp_path / "m.tsv", columns={"id": "qid", "question": "query", "image": "img"})
    assert sample.id == "t1" and sample.images == (png(items[0].image),)
    (tmp_path / "j").mkdir()
    items[0].image.save(tmp_path / "j" / "p.png")
    (tmp_path / "j" / "data.jsonl").write_text(
        json.dumps({"uid": 3, "prompt": "q", "pics": ["p.png", "p.png"]}) + "\n"
    )
    (sample,) = load_jsonl(tmp_path / "j", columns={"id": "uid", "question": "prompt", "image": "pics"})
    assert sample.id == "3" and len(sample.images) == 2 and sample.meta == {}


def test_save_to_disk_multi_image_split_and_dataset_dict(items, tmp_path):
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "images": datasets.List(datasets.Image()),
        }
    )
    data = {
        "id": ["x", "y", "z"],
        "question": ["q"] * 3,
        "images": [[items[0].image, items[1].image], [items[2].image], []],
    }
    ds = datasets.Dataset.from_dict(data, features=features, split="testmini").select([2, 0, 1])
    ds.save_to_disk(str(tmp_path / "one"))
    samples = load_dataset(tmp_path / "one")
    assert [s.id for s in samples] == ["z", "x", "y"]  # save_to_disk wrote the selection
    assert [len(s.images) for s in samples] == [0, 2, 1] and {s.split for s in samples} == {"testmini"}
    assert open_image(samples[1].images[1]).tobytes() == items[1].image.tobytes()
    datasets.DatasetDict({"test": ds, "testmini": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DatasetError, match=r"several splits .*dd/test, .*dd/testmini"):
        load_dataset(tmp_path / "dd")
    assert [s.id for s in load_dataset(tmp_path / "dd" / "testmini")] == ["z", "x", "y"]


def test_jsonl_images_options_and_hint(items, tmp_path):
    items[0].image.save(tmp_path / "a.png")
    items[1].image.save(tmp_path / "b.png")
    rows = [
        {
            "id": 1,
            "question": "q",
            "images": ["a.png", "b.png"],
            "options": ["3", "5"],
            "answer": "B",
            "hint": "h",
        },
        {
            "id": 2,
            "question": "q",
            "image": "a.png",
            "options": {"A": "x", "B": None, "C": "z"},
            "answer": "C",
        },
        {"id": 3, "question": "q", "A": "left", "B": "right", "answer": "A", "extra": [1, 2]},
        {"id": 4, "question": "open", "answer": "12", "response": "answer 12"},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_dataset(tmp_path / "d.jsonl")
    assert samples[0].images == ((tmp_path / "a.png").resolve(), (tmp_path / "b.png").resolve())
    assert [s.options for s in samples] == [
        (("A", "3"), ("B", "5")),
        (("A", "x"), ("C", "z")),
        (("A", "left"), ("B", "right")),
        (),
    ]
    assert (
        samples[0].hint == "h" and samples[2].meta == {"extra": [1, 2]} and samples[3].response == "answer 12"
    )
    assert sample_images(samples[0]) == samples[0].images and sample_images(items[0]) == (items[0].image,)


# -- bad input: one DatasetError naming file and row ----------------------------------------------------


def test_tsv_errors(items, tmp_path):
    good = b64(png(items[0].image))

    def tsv(rows, name="e.tsv"):
        write_tsv(tmp_path / name, rows)
        return tmp_path / name

    with pytest.raises(DatasetError, match=r"e\.tsv:3: image cell 'nope' is neither base64 nor the index"):
        load_dataset(
            tsv(
                [{"index": 1, "image": good, "question": "q"}, {"index": 2, "image": "nope", "question": "q"}]
            )
        )
    with pytest.raises(DatasetError, match=r"e\.tsv:2: image cell '#{20}\.\.\.' is neither base64"):
        load_dataset(tsv([{"index": 1, "image": "#" * 100, "question": "q"}]))
    with pytest.raises(
        DatasetError, match=r"e\.tsv:4: image cell '2' is neither base64 nor the index"
    ):  # no chains
        load_dataset(
            tsv(
                [
                    {"index": 1, "image": good, "question": "q"},
                    {"index": 2, "image": "1", "question": "q"},
                    {"index": 3, "image": "2", "question": "q"},
                ]
            )
        )
    with pytest.raises(DatasetError, match=r"e\.tsv:2: image cannot be decoded"):
        load_dataset(tsv([{"index": 1, "image": b64(b"GIF89a" + b"\0" * 80), "question": "q"}]))
    with pytest.raises(DatasetError, match=r"e\.tsv:2: image 2 of 2: image cannot be decoded"):
        load_dataset(
            tsv([{"index": 1, "image": str([good, b64(png(items[1].image)[:-30])]), "question": "q"}])
        )
    with pytest.raises(
        DatasetError,
        match=r"column 'query' \(mapped to 'question'\) not found; columns: index, image, question",
    ):
        load_dataset(tsv([{"index": 1, "image": good, "question": "q"}]), columns={"question": "query"})
    with pytest.raises(DatasetError, match=r"no 'id' or 'index' column; map one with columns=\{'id': NAME\}"):
        load_dataset(tsv([{"qid": 1, "question": "q"}]))
    with pytest.raises(DatasetError, match=r"e\.tsv:3: duplicate id '1' \(first at .*e\.tsv:2\)"):
        load_dataset(tsv([{"index": 1, "question": "q"}, {"index": 1, "question": "r"}]))
    with pytest.raises(DatasetError, match=r"e\.tsv:3: missing required field 'id' or 'index'"):
        load_dataset(tsv([{"index": 1, "question": "q"}, {"index": None, "question": "r"}]))
    with pytest.raises(
        DatasetError, match=r"e\.tsv:2: answer 'B' is an option letter, but the item has no options"
    ):
        load_dataset(
            tsv(
                [
                    {"index": 1, "question": "q", "A": None, "B": None, "answer": "B"},
                    {"index": 2, "question": "q", "A": "x", "B": "y", "answer": "A"},
                ]
            )
        )
    (tmp_path / "header_only.tsv").write_text("index\tquestion\n")
    with pytest.raises(DatasetError, match=r"dataset has no samples: .*header_only\.tsv"):
        load_dataset(tmp_path / "header_only.tsv")
    (tmp_path / "bad.tsv").write_bytes(b"index\tquestion\n1\tfine\n2\tcaf\xe9\n")
    with pytest.raises(DatasetError, match=r"bad\.tsv:3: not valid UTF-8"):
        load_dataset(tmp_path / "bad.tsv")
    (tmp_path / "short.tsv").write_text("index\tquestion\tanswer\n1\tq\t2\n2\tq\n")
    with pytest.raises(DatasetError, match=r"short\.tsv:3: 2 cells, but the header has 3 columns"):
        load_dataset(tmp_path / "short.tsv")


def test_parquet_errors(items, tmp_path):
    def parquet(columns, name="e.parquet"):
        pq.write_table(pa.table(columns), tmp_path / name)
        return tmp_path / name

    good = png(items[0].image)
    with pytest.raises(DatasetError, match=r"e\.parquet row 1 \(0-based\): 'image': image cannot be decoded"):
        load_dataset(parquet({"id": ["a", "b"], "question": ["q", "q"], "image": [good, b"\x89PNG garbage"]}))
    with pytest.raises(
        DatasetError, match=r"row 0 \(0-based\): 'image': image cannot be decoded"
    ):  # truncated PNG
        load_dataset(parquet({"id": ["a"], "question": ["q"], "image": [good[: len(good) // 2]]}))
    with pytest.raises(
        DatasetError, match=r"row 0 \(0-based\): 'image' image 2 of 2: image not found: .*nowhere\.png"
    ):
        pair_of = [{"bytes": good, "path": None}, {"bytes": None, "path": "nowhere.png"}]
        load_dataset(parquet({"id": ["a"], "question": ["q"], "image": [pair_of]}))
    with pytest.raises(
        DatasetError, match=r"row 0 \(0-based\): 'image': cannot read an image from a int cell"
    ):
        load_dataset(parquet({"id": ["a"], "question": ["q"], "image": [7]}))
    with pytest.raises(
        DatasetError, match=r"column 'gt' \(mapped to 'answer'\) not found; columns: id, question"
    ):
        load_dataset(parquet({"id": ["a"], "question": ["q"]}), columns={"answer": "gt"})
    with pytest.raises(DatasetError, match=r"row 1 \(0-based\): duplicate id 'a' \(first at .*row 0"):
        load_dataset(parquet({"id": ["a", "a"], "question": ["q", "q"]}))
    with pytest.raises(DatasetError, match=r"row 0 \(0-based\): missing required field 'id' or 'index'"):
        load_dataset(parquet({"id": pa.array([None], pa.string()), "question": ["q"]}))
    with pytest.raises(DatasetError, match=r"row 0 \(0-based\): 'question' is not valid UTF-8"):
        load_dataset(parquet({"id": ["a"], "question": pa.array([b"caf\xe9"], pa.binary())}))
    with pytest.raises(DatasetError, match=r"dataset has no samples"):
        load_dataset(parquet({"id": pa.array([], pa.string()), "question": pa.array([], pa.string())}))
    with pytest.raises(DatasetError, match=r"row 0 \(0-based\): answer 'A' is an option letter"):
        load_dataset(
            parquet(
                {"id": ["a", "b"], "question": ["q", "q"], "options": [[], ["x", "y"]], "answer": ["A", "B"]}
            )
        )
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"junk\.parquet: cannot read as Parquet"):
        load_dataset(tmp_path / "junk.parquet")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "dataset_info.json").write_text("{}")
    with pytest.raises(DatasetError, match=r"not a save_to_disk folder \(no state\.json\)"):
        load_dataset(tmp_path / "half")


def test_jsonl_errors(items, tmp_path):
    def jsonl(rows, name="e.jsonl"):
        (tmp_path / name).write_text(
            "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
        )
        return tmp_path / name

    with pytest.raises(DatasetError, match=r"e\.jsonl:2: 'options' is given but empty"):
        load_dataset(
            jsonl([{"id": 1, "question": "q"}, {"id": 2, "question": "q", "options": {}, "answer": "B"}])
        )
    with pytest.raises(DatasetError, match=r"e\.jsonl:1: 'options' must be a list of option texts"):
        load_dataset(jsonl([{"id": 1, "question": "q", "options": "A or B"}]))
    with pytest.raises(DatasetError, match=r"e\.jsonl:2: duplicate id '1' \(first at .*e\.jsonl:1\)"):
        load_dataset(jsonl([{"id": 1, "question": "q"}, {"id": "1", "question": "q"}]))
    with pytest.raises(DatasetError, match=r"e\.jsonl:1: missing required field 'id' or 'index'"):
        load_dataset(jsonl([{"question": "q"}]))
    with pytest.raises(DatasetError, match=r"e\.jsonl:1: give 'image' or 'images', not both"):
        load_dataset(jsonl([{"id": 1, "question": "q", "image": "a.png", "images": ["a.png"]}]))
    with pytest.raises(DatasetError, match=r"e\.jsonl:1: 'images' must be a path or a list of paths"):
        load_dataset(jsonl([{"id": 1, "question": "q", "images": [3]}]))
    with pytest.raises(
        DatasetError, match=r"key 'gt' \(mapped to 'answer'\) is in no line; keys: id, question"
    ):
        load_dataset(jsonl([{"id": 1, "question": "q"}]), columns={"answer": "gt"})
    with pytest.raises(
        DatasetError,
        match=r"e\.jsonl:1: missing required field 'query' \(mapped to 'question'\) \(row has: id, question\)",
    ):
        load_dataset(jsonl([{"id": 1, "question": "q"}]), columns={"question": "query"})
    with pytest.raises(
        DatasetError, match=r"e\.jsonl:2: missing required field 'query' \(mapped to 'question'\)"
    ):
        load_dataset(
            jsonl([{"id": 1, "query": "q"}, {"id": 2, "question": "q"}]), columns={"question": "query"}
        )
    (tmp_path / "latin.jsonl").write_bytes(b'{"id": 1, "question": "q"}\n{"id": 2, "question": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"latin\.jsonl:2: not valid UTF-8"):
        load_dataset(tmp_path / "latin.jsonl")


def test_unknown_formats_and_bad_mappings(tmp_path):
    (tmp_path / "data.csv").write_text("id,question\n1,q\n")
    with pytest.raises(
        DatasetError, match=r"unknown dataset format '\.csv' .*expected a \.jsonl, \.tsv or \.parquet"
    ):
        load_dataset(tmp_path / "data.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no dataset found in folder .*empty"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match=r"dataset not found"):
        load_dataset(tmp_path / "missing.tsv")
    assert parse_columns("") == {} and parse_columns(None) == {}
    with pytest.raises(ConfigError, match=r"expected FIELD=COLUMN, got 'question'"):
        parse_columns("question")
    with pytest.raises(ConfigError, match=r"unknown dataset field 'questoin'.*fields: id, question, answer"):
        parse_columns("questoin=query")
    with pytest.raises(ConfigError, match=r"field 'answer' is mapped twice"):
        parse_columns("answer=a,answer=b")
    with pytest.raises(ConfigError, match=r"unknown dataset field 'bogus'"):
        load_dataset(tmp_path / "data.csv", columns={"bogus": "x"})


def test_check_images_decodes_paths_and_bytes(items, tmp_path):
    good = png(items[0].image)
    truncated_jpeg = BytesIO()
    items[0].image.save(truncated_jpeg, format="JPEG")
    ok = [Sample(id="a", question="q", images=(good,)), items[1]]
    check_images(ok)
    with pytest.raises(
        InputError, match=r"sample 'b' image 2 of 2: unreadable or corrupt image \(\d+ bytes\)"
    ):
        check_images([*ok, Sample(id="b", question="q", images=(good, truncated_jpeg.getvalue()[:200]))])
    with pytest.raises(InputError, match=r"sample 'c': image not found"):
        check_images([Sample(id="c", question="q", images=(tmp_path / "gone.png",))])


def test_tsv_records_split_like_the_csv_module():
    """The fast path (lines without quotes split on tabs) gives csv.reader's records and line numbers."""
    import csv
    import random

    from lens.datasets.tsv import records

    rng = random.Random(0)
    alphabet = ["a", "bc", "\t", "\n", "\r\n", "\r", '"', " ", "é"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        reader = csv.reader(StringIO(text, newline=""), delimiter="\t")
        expected, line = [], 1
        for cells in reader:
            expected.append((line, cells))
            line = reader.line_num + 1
        assert list(records(StringIO(text, newline=""))) == expected, repr(text)


def test_rows_are_numbered_across_batches_and_arrow_file_format(items, tmp_path):
    n = 600  # more than one record batch
    cells = [None] * n
    cells[3], cells[555] = png(items[0].image), b"\x89PNG\r\n\x1a\n broken"
    table = pa.table(
        {"id": [f"r{i}" for i in range(n)], "question": ["q"] * n, "image": pa.array(cells, pa.binary())}
    )
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=100)
    with pytest.raises(
        DatasetError, match=r"big\.parquet row 555 \(0-based\): 'image': image cannot be decoded"
    ):
        load_dataset(tmp_path / "big.parquet")
    # A save_to_disk-style folder whose Arrow file uses the random-access file format, not the stream.
    folder = tmp_path / "saved"
    folder.mkdir()
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table.slice(0, 10))
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    samples = load_dataset(folder)
    assert [s.id for s in samples] == [f"r{i}" for i in range(10)] and samples[3].images == (cells[3],)

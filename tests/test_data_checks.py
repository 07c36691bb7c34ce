"""Bad training data is found at start-up, not mid-run: every image is decoded in full, every
caption checked, and the message names the files. The bad files are built by hand."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from diffusers import UNet2DConditionModel
from PIL import Image

from helpers import add_image, png_with_corrupt_data, rows, train_argv, write_rows
from sd_memfree.data import DataError, check_samples, load_image_caption_dataset
from train_scripts import train_sd_ietagc as train


def truncated_jpeg(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def test_hand_built_files_pass_pil_verify_but_do_not_decode():
    """The premise: the old start-up check (Image.verify) accepted both files."""
    for blob in (png_with_corrupt_data(), truncated_jpeg()):
        with Image.open(io.BytesIO(blob)) as im:
            im.verify()
        with pytest.raises(OSError):
            with Image.open(io.BytesIO(blob)) as im:
                im.load()


@pytest.fixture
def data_copy(tiny_data_dir, tmp_path):
    """A private copy of the 12-row tiny set: rows() / write_rows() edit its metadata.jsonl."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_data_dir, dst)
    return dst


def test_truncated_jpeg_and_corrupt_png_fail_at_load_naming_both(data_copy):
    add_image(data_copy, "cut.jpg", truncated_jpeg())
    add_image(data_copy, "scrambled.png", png_with_corrupt_data())
    with pytest.raises(DataError) as err:
        load_image_caption_dataset(train_data_dir=str(data_copy))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("2 of 14 training samples cannot be used:")
    assert f"{data_copy / 'cut.jpg'}" in msg and "image file is truncated" in msg
    assert f"{data_copy / 'scrambled.png'}" in msg and "broken data stream" in msg
    assert "--drop_bad_samples" in msg


@pytest.mark.parametrize("caption, problem", [(None, "caption is None"), ("  ", "empty caption")])
def test_bad_caption_fails_at_load(data_copy, caption, problem):
    r = rows(data_copy)
    r[3]["text"] = caption
    write_rows(data_copy, r)
    with pytest.raises(DataError) as err:
        load_image_caption_dataset(train_data_dir=str(data_copy))
    assert f"1 of 12 training samples cannot be used: {data_copy / r[3]['file_name']} (sample 3): {problem}" in str(err.value)


def test_caption_lists_need_non_empty_strings():
    """Upstream picks one caption of a list: every entry must be usable, and the list non-empty."""
    import datasets

    img = Image.new("RGB", (8, 8))
    ds = datasets.Dataset.from_dict({"image": [img] * 4, "text": [["a", "b"], [], ["ok", ""], ["fine"]]},
                                    features=datasets.Features({"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string"))}))
    kept, dropped = check_samples(ds, "image", "text", drop_bad=True, progress=False)
    assert [d["index"] for d in dropped] == [1, 2] and len(kept) == 2
    assert all(d["problem"].startswith("caption list is empty or holds a non-string/empty entry") for d in dropped)


def test_non_utf8_metadata_names_file_and_line(data_copy):
    meta = data_copy / "metadata.jsonl"
    lines = meta.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"text": "', b'"text": "caf\xe9 ')  # latin-1 e-acute
    meta.write_bytes(b"".join(lines))
    with pytest.raises(DataError) as err:
        load_image_caption_dataset(train_data_dir=str(data_copy))
    msg = str(err.value)
    assert msg.startswith(f"{meta}:2 is not UTF-8 (byte 0xe9 at column ")
    assert "save the file as UTF-8" in msg


def test_drop_bad_samples_reports_what_was_dropped(data_copy):
    add_image(data_copy, "cut.jpg", truncated_jpeg())
    r = rows(data_copy)
    r[0]["text"] = None
    write_rows(data_copy, r)
    ds, image_column, caption_column = load_image_caption_dataset(train_data_dir=str(data_copy), verify_images=False)
    kept, dropped = check_samples(ds, image_column, caption_column, drop_bad=True, progress=False)
    assert len(ds) == 13 and len(kept) == 11
    assert [(d["index"], d["problem"].split(" (")[0]) for d in dropped] == [(0, "caption is None"), (12, "OSError: image file is truncated")]
    assert dropped[1]["where"] == f"{data_copy / 'cut.jpg'} (sample 12)"
    assert None not in kept[caption_column]


def test_clean_data_passes_unchanged(tiny_data_dir):
    ds, image_column, caption_column = load_image_caption_dataset(train_data_dir=str(tiny_data_dir), verify_images=False)
    kept, dropped = check_samples(ds, image_column, caption_column, num_workers=2, progress=False, chunk_size=5)
    assert dropped == [] and len(kept) == len(ds) == 12


def test_training_stops_before_models_load_on_null_caption(tiny_model_dir, data_copy, tmp_path, monkeypatch, capsys):
    """Today's failure: a null caption stopped the run after checkpoint-2. Now: one line, nothing written."""
    r = rows(data_copy)
    r[5]["text"] = None
    write_rows(data_copy, r)
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train.cli(train_argv(tiny_model_dir, data_copy, out, steps=2, learning_rate=None, checkpointing_steps=1))
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"error: 1 of 12 training samples cannot be used: {data_copy / r[5]['file_name']} (sample 5): caption is None; "
                    "fix or remove them, or pass --drop_bad_samples to train without them.")
    assert not list(out.glob("checkpoint-*"))


def test_training_with_drop_bad_samples_trains_on_the_rest(tiny_model_dir, data_copy, tmp_path):
    add_image(data_copy, "scrambled.png", png_with_corrupt_data())
    out = tmp_path / "run"
    summary = train.main(train.parse_args(train_argv(tiny_model_dir, data_copy, out, "--use_lora", "--drop_bad_samples", steps=2, learning_rate=None, checkpointing_steps=1)))
    assert summary["num_samples"] == 12 and summary["global_step"] == 2
    dropped = json.loads((out / "dropped_samples.json").read_text())
    assert [d["where"] for d in dropped] == [f"{data_copy / 'scrambled.png'} (sample 12)"]

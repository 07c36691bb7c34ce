"""Trajectory settings and the data fingerprint a resume compares (sd_memfree/run/resume.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from sd_memfree.run.resume import TRAJECTORY_FILE, check_budget_change, check_same_trajectory, data_fingerprint, write_trajectory


def test_check_names_each_flag_saved_value_first_and_the_data(tmp_path):
    """Saved {a: 1, b: 2.5, data: x}; now {a: 1, b: 3.0, data: y} -> one line with --b=2.5 before
    --b=3.0 and both data descriptions; an equal run passes; a key only this run has is ignored."""
    write_trajectory(tmp_path, {"a": 1, "b": 2.5, "data": "x"})
    check_same_trajectory(tmp_path, {"a": 1, "b": 2.5, "data": "x", "new_flag": True})
    with pytest.raises(ValueError) as e:
        check_same_trajectory(tmp_path, {"a": 1, "b": 3.0, "data": "y"})
    msg = str(e.value)
    assert "\n" not in msg
    assert "was written with --b=2.5 but this run has --b=3.0" in msg and "--a=" not in msg
    assert "other data (x) than this run's (y)" in msg


def test_checkpoint_without_trajectory_is_refused(tmp_path):
    with pytest.raises(ValueError, match=f"no {TRAJECTORY_FILE}"):
        check_same_trajectory(tmp_path, {})


def _load(folder):
    from sd_memfree.data import load_image_caption_dataset

    return load_image_caption_dataset(train_data_dir=str(folder), verify_images=False)


def test_fingerprint_follows_captions_files_and_order_not_the_folder(tiny_data_dir, tmp_path):
    """A copy of the data elsewhere has the same fingerprint (folders move); an edited caption,
    an image replaced by one of another size, or another order changes it; images embedded in
    the dataset (Hub parquet) are measured by byte length."""
    import datasets

    ds, image_column, caption_column = _load(tiny_data_dir)
    base = data_fingerprint(ds, image_column, caption_column)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data_dir, copy)
    assert data_fingerprint(*_load(copy)) == base

    rows = [json.loads(line) for line in (copy / "metadata.jsonl").read_text().splitlines() if line.strip()]
    edited = tmp_path / "caption"
    shutil.copytree(tiny_data_dir, edited)
    (edited / "metadata.jsonl").write_text("".join(json.dumps(dict(r, text=r["text"] + "!" if i == 0 else r["text"])) + "\n"
                                                   for i, r in enumerate(rows)))
    assert data_fingerprint(*_load(edited)) != base

    grown = tmp_path / "image"
    shutil.copytree(tiny_data_dir, grown)
    with open(grown / rows[0]["file_name"], "ab") as f:
        f.write(b"\0" * 16)  # same name, 16 bytes longer
    assert data_fingerprint(*_load(grown)) != base

    assert data_fingerprint(ds.select(list(reversed(range(len(ds))))), image_column, caption_column) != base

    raw = ds.cast_column(image_column, datasets.Image(decode=False))
    embedded = datasets.Dataset.from_dict({
        image_column: [{"bytes": open(r["path"], "rb").read(), "path": None} for r in raw[image_column]],
        caption_column: raw[caption_column]}).cast_column(image_column, datasets.Image())
    again = datasets.Dataset.from_dict({
        image_column: [{"bytes": open(r["path"], "rb").read() + (b"\0" if i == 0 else b""), "path": None} for i, r in enumerate(raw[image_column])],
        caption_column: raw[caption_column]}).cast_column(image_column, datasets.Image())
    assert data_fingerprint(embedded, image_column, caption_column) != data_fingerprint(again, image_column, caption_column)


def test_budget_change_is_refused_only_past_the_rounds_both_budgets_share():
    """K=2, H=2: rounds of 4 steps. Budgets 8 and 12 are whole rounds: any step resumes from one
    to the other. Budget 10 shortens its third round (steps 9-10, one step per proxy): a
    checkpoint at step 9 or 10 of it cannot move to 12 (there step 9 is proxy 0's first of two),
    but step 8 can; and a checkpoint at step 9 of a 12-step run cannot move to 10."""
    for step, saved, new in [(6, 8, 12), (8, 12, 8), (8, 10, 12), (9, 10, 10), (3, 10, 6)]:
        check_budget_change("ckpt", step, saved, new, num_shards=2, merge_every=2)
    check_budget_change("ckpt", 9, 10, 12, num_shards=1, merge_every=2)  # no shards: no rounds
    check_budget_change("ckpt", 9, None, 12, num_shards=2, merge_every=2)  # unknown budget (another script)
    for step, saved, new, limit in [(9, 10, 12, 8), (10, 10, 12, 8), (9, 12, 10, 8), (5, 6, 8, 4), (5, 6, 9, 4)]:
        with pytest.raises(ValueError) as exc:
            check_budget_change("ckpt", step, saved, new, num_shards=2, merge_every=2)
        line = str(exc.value)
        assert "\n" not in line and f"--max_train_steps={saved} but this run has --max_train_steps={new}" in line
        assert f"from a checkpoint at step <= {limit}" in line

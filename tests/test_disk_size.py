"""sd_memfree/run/disk_size.py: the sizes the checkpoint log lines print."""

from sd_memfree.run.disk_size import folder_bytes, human_bytes


def test_folder_bytes_counts_regular_files_once(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"x" * 1500)
    (tmp_path / "state.json").write_bytes(b"y" * 20)
    (tmp_path / "link").symlink_to(tmp_path / "state.json")
    assert folder_bytes(tmp_path) == 1520
    assert folder_bytes(tmp_path / "gone") == 0


def test_human_bytes_uses_decimal_units():
    assert [human_bytes(n) for n in (512, 1500, 37_800_000_000, 10**16)] == ["512 B", "1.5 kB", "37.8 GB", "10000.0 TB"]

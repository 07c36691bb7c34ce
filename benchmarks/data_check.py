"""Cost of the start-up data check (``data.check_samples``: full decode of every image, every
caption checked) per image on this machine.

    python benchmarks/data_check.py [--num_images 100 --size 512 --threads 1 2]

Writes ``num_images`` smooth, photo-like RGB images as JPEG (quality 90) and as PNG into an
imagefolder, runs the check once to warm the page cache, then times it. Prints wall and CPU
milliseconds per image; the last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from sd_memfree.data import check_samples, load_image_caption_dataset


def write_folder(folder: str, num_images: int, size: int, fmt: str) -> float:
    """An imagefolder of ``num_images`` images; returns the mean file size in KiB."""
    os.makedirs(folder)
    rng = np.random.RandomState(0)
    x = np.linspace(0, 1, size)
    rows = []
    for i in range(num_images):
        img = np.outer(np.sin(x * (i + 3)), np.cos(x * 5)) * 100 + 128 + rng.randn(size, size) * 8
        arr = np.stack([img, img[::-1], img.T], -1).clip(0, 255).astype(np.uint8)
        name = f"{i:05d}.{fmt.lower().replace('jpeg', 'jpg')}"
        Image.fromarray(arr).save(os.path.join(folder, name), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        rows.append({"file_name": name, "text": f"picture {i}"})
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return sum(os.path.getsize(os.path.join(folder, r["file_name"])) for r in rows) / num_images / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_images", type=int, default=100)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a = p.parse_args()
    figures = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "size": a.size}
    root = tempfile.mkdtemp()
    for fmt in ("JPEG", "PNG"):
        folder = os.path.join(root, fmt.lower())
        kib = write_folder(folder, a.num_images, a.size, fmt)
        ds, image_column, caption_column = load_image_caption_dataset(train_data_dir=folder, verify_images=False)
        for threads in a.threads:
            check_samples(ds, image_column, caption_column, num_workers=threads, progress=False)
            wall, cpu = time.perf_counter(), time.process_time()
            check_samples(ds, image_column, caption_column, num_workers=threads, progress=False)
            wall, cpu = (time.perf_counter() - wall) / a.num_images * 1e3, (time.process_time() - cpu) / a.num_images * 1e3
            print(f"{fmt} {a.size}x{a.size} (~{kib:.0f} KiB): {threads} thread(s): {wall:.1f} ms/image wall, {cpu:.1f} ms/image CPU")
            figures[f"{fmt.lower()}_{threads}t_ms_wall"] = round(wall, 2)
            figures[f"{fmt.lower()}_{threads}t_ms_cpu"] = round(cpu, 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""Scorer throughput on this machine: SSCD embedding (images/s) and exact search time.

    python benchmarks/scoring.py [--num_gen 4000 --num_train 100000 --embed_images 32 --trunk resnet50]

Embedding uses the stand-in SSCD (same architecture as the real one when --trunk resnet50: ResNet-50,
GeM, 512-d; random weights, so the speed is the real model's) at the ``dcr`` preprocessing. Search
is ``search.max_similarity`` of ``num_gen`` generations over ``num_train`` synthetic unit 512-d
training embeddings, against one dense ``[num_gen, 512] @ [512, num_train]`` product (the
limit). Floor: ratio <= 1.5. The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

from sd_memfree.scoring import search, sscd
from sd_memfree.testing import standin
from sd_memfree.testing.tiny import make_tiny_image


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_gen", type=int, default=4000)
    p.add_argument("--num_train", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--embed_images", type=int, default=32)
    p.add_argument("--trunk", default="resnet50")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        model = sscd.load_sscd(str(standin.make_standin_sscd(os.path.join(tmp, "sscd.pt"), trunk=args.trunk)), device)
    images = [make_tiny_image(i, size=256)[0] for i in range(args.embed_images)]
    sscd.embed_images(model, images[:2], "dcr", batch_size=2, device=device)  # warm-up
    t_embed = best_of(lambda: sscd.embed_images(model, images, "dcr", batch_size=32, device=device), 1)
    print(f"embedding: {args.embed_images / t_embed:.1f} images/s (stand-in SSCD, {args.trunk} trunk, dcr 224 px, {device})")

    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(args.num_train, args.dim, generator=g), dim=1).to(device)
    gen = torch.nn.functional.normalize(torch.randn(args.num_gen, args.dim, generator=g), dim=1).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def dense():
        gen @ train.T
        sync()

    def chunked():
        search.max_similarity(gen, train, k=1, device=device)
        sync()

    dense()  # warm-up
    t_dense = best_of(dense, args.repeats)
    t_search = best_of(chunked, args.repeats)
    ratio = t_search / t_dense
    print(f"search: {args.num_gen} x {args.num_train} x {args.dim}: {t_search:.3f} s; one dense matmul {t_dense:.3f} s; ratio {ratio:.2f} (floor <= 1.5)")
    print(json.dumps({
        "embed_images_per_s": round(args.embed_images / t_embed, 2), "embed_trunk": args.trunk, "device": str(device),
        "cpu_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "num_gen": args.num_gen, "num_train": args.num_train, "dim": args.dim,
        "search_s": round(t_search, 4), "dense_matmul_s": round(t_dense, 4), "ratio": round(ratio, 3), "ratio_ok": ratio <= 1.5,
    }))


if __name__ == "__main__":
    main()

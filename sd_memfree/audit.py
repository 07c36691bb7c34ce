"""``sd-memfree audit``: know what in the training data a model is likely to copy, before training.

    sd-memfree audit --train_data_dir ./my_images --out audit/ [--no_sscd]
        [--write_deduplicated ./my_images_dedup --max_copies 1]

Duplicated training images are what diffusion models copy (Carlini et al. 2023, Somepalli et al.
2023). The audit reads the data with the training scripts' loader and checks (``sd_memfree.data``:
bad input stops with one line, as in training), then:

1. fingerprints every image (exact pixels, perceptual hash, colour thumbnail; ``duplicates``) and
   links exact copies and near-duplicates (re-encoded, resized, slightly cropped);
2. unless ``--no_sscd``, embeds every image with the scorer's SSCD model (same file, same
   embedding cache as ``sd-memfree score``) and links pairs at cosine >= ``--threshold`` (the
   scorer's copy threshold by default);
3. groups captions shared by several distinct images, and images shared under several captions;
4. writes ``audit.json`` and ``report.html`` in ``--out``, and with ``--write_deduplicated`` an
   imagefolder keeping at most ``--max_copies`` rows of each cluster (``deduplicate``).

Invariants:
- Every search is exact (``duplicates.threshold_pairs``, chunked) unless the set holds more than
  ``--faiss_above`` images and FAISS is installed; then FAISS's recall against the exact search is
  measured on a sample of rows and written to ``audit.json`` (``search.recall_vs_exact``).
- Exact copies are collapsed to their first row before the near and SSCD searches, so a set of
  many identical images cannot blow up the number of pairs.
- Row indices are the rows of the dataset as the training scripts load it (same order).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch

from sd_memfree import duplicates
from sd_memfree.data import add_data_arguments

logger = logging.getLogger("sd_memfree.audit")

# The scorer's --threshold default: a generation above it counts as a copy (the papers' 0.5).
COPY_THRESHOLD = 0.5
AUDIT_FILE = "audit.json"
REPORT_FILE = "report.html"
DEFAULT_FAISS_ABOVE = 1_000_000  # the exact search is ~N^2 D flops: minutes on a GPU at 1M x 1M x 1024
RECALL_SAMPLE = 1000  # rows whose exact pairs are compared with FAISS's


class AuditError(ValueError):
    """Bad audit input (besides the data's own ``DataError``), one line naming the fix."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sd_memfree.scoring import sscd

    p = argparse.ArgumentParser(prog="sd-memfree audit", description="Find duplicated images and captions in training data before training.")
    add_data_arguments(p, "training data (same loader and checks as training)")
    p.add_argument("--out", required=True, help=f"Output folder: {AUDIT_FILE} and {REPORT_FILE}.")
    near = p.add_argument_group("near-duplicates (cheap pass: colour thumbnail + perceptual hash)")
    near.add_argument("--thumb_rms", type=float, default=duplicates.DEFAULT_THUMB_RMS,
                      help="Largest RMS difference of two 8x8 colour thumbnails (pixels in [0, 1]) for a near-duplicate.")
    near.add_argument("--hash_distance", type=int, default=duplicates.DEFAULT_HASH_DISTANCE,
                      help="Largest Hamming distance of two 64-bit perceptual hashes (imagehash.phash) for a near-duplicate.")
    sem = p.add_argument_group("semantic pass (SSCD, the scorer's model and embedding cache)")
    sem.add_argument("--no_sscd", action="store_true", help="Run the exact and perceptual-hash passes only (offline, or when speed matters).")
    sem.add_argument("--sscd_model", default="sscd_disc_large", help=f"SSCD TorchScript file or known name ({', '.join(sscd.KNOWN_SSCD_MODELS)}), as in `sd-memfree score`.")
    sem.add_argument("--preprocess", choices=sscd.PREPROCESSINGS, default="dcr", help="SSCD preprocessing, as in `sd-memfree score`.")
    sem.add_argument("--threshold", type=float, default=COPY_THRESHOLD,
                     help="SSCD cosine similarity at or above which two images are duplicates (default: the scorer's copy threshold).")
    sem.add_argument("--embedding_cache_dir", default=None, help="Where training-set embeddings are cached (default $SD_MEMFREE_CACHE/embeddings, shared with the scorer).")
    sem.add_argument("--batch_size", type=int, default=64, help="SSCD embedding batch size.")
    sem.add_argument("--faiss_above", type=int, default=DEFAULT_FAISS_ABOVE,
                     help="Use FAISS (pip install 'sd-memfree[faiss]') for the SSCD search above this many images; exact chunked search otherwise.")
    sem.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    dd = p.add_argument_group("deduplicated copy")
    dd.add_argument("--write_deduplicated", default=None, metavar="OUT", help="Write an imagefolder (hard links + metadata.jsonl) keeping at most --max_copies rows per cluster.")
    dd.add_argument("--max_copies", type=int, default=None, help="Rows kept of each duplicate cluster in --write_deduplicated (default 1).")
    args = p.parse_args(argv)
    if args.dataset_name is None and args.train_data_dir is None:
        p.error("no training data given: pass --dataset_name (Hub name or local folder) or --train_data_dir (imagefolder).")
    if not 0 <= args.threshold < 1 or math.isnan(args.threshold):
        p.error(f"--threshold={args.threshold} must be a similarity in [0, 1) ({COPY_THRESHOLD} is the scorer's copy threshold).")
    if not 0 <= args.thumb_rms < 1:
        p.error(f"--thumb_rms={args.thumb_rms} must be in [0, 1) (default {duplicates.DEFAULT_THUMB_RMS}).")
    if not 0 <= args.hash_distance <= duplicates.HASH_BITS:
        p.error(f"--hash_distance={args.hash_distance} must be in [0, {duplicates.HASH_BITS}] (default {duplicates.DEFAULT_HASH_DISTANCE}).")
    if args.max_copies is not None and args.write_deduplicated is None:
        p.error("--max_copies applies to --write_deduplicated; add --write_deduplicated OUT or drop it.")
    args.max_copies = 1 if args.max_copies is None else args.max_copies
    if args.max_copies < 1:
        p.error(f"--max_copies={args.max_copies} must be >= 1 (1 keeps one row of each cluster).")
    if args.batch_size < 1:
        p.error(f"--batch_size={args.batch_size} must be >= 1.")
    return args


def source_paths(dataset, image_column: str) -> list[str | None]:
    """The file each row's image was read from, without decoding (None: bytes held in the dataset)."""
    import datasets

    if not isinstance(dataset.features.get(image_column), datasets.Image):
        return [None] * len(dataset)
    cells = dataset.cast_column(image_column, datasets.Image(decode=False))[image_column]
    return [c.get("path") if isinstance(c, dict) and c.get("path") and not c.get("bytes") else None for c in cells]


def _display_name(path: str | None, index: int) -> str:
    return Path(path).name if path else f"row {index}"


def _sscd_embeddings(args, dataset, image_column: str, device) -> tuple[torch.Tensor, dict]:
    """The training set's SSCD descriptors through the scorer's cache (a hit when the scorer or a
    previous audit embedded the same data with the same model file and preprocessing).

    Under ``accelerate launch`` / ``torchrun`` every process embeds its contiguous slice of the
    rows and the slices are gathered in row order (``Collectives``), so W processes compute what
    one would; every process must call this at the same point. Process 0 decides whether the
    cache holds them, so all take the same path, and writes the cache."""
    from sd_memfree.collectives import Collectives
    from sd_memfree.scoring import cache as cache_lib
    from sd_memfree.scoring import sscd

    comm = Collectives()
    W, rank = comm.layout.world_size, comm.layout.rank
    path = sscd.resolve_sscd_path(args.sscd_model)
    model = sscd.load_sscd(str(path), device)
    sha = sscd.file_sha256(path)
    key = cache_lib.cache_key(sha, args.preprocess, cache_lib.dataset_fingerprint(dataset), image_column, len(dataset))
    store = cache_lib.EmbeddingCache(args.embedding_cache_dir or sscd.cache_root() / "embeddings")

    def embed(rows) -> torch.Tensor:
        return sscd.embed_dataset_images(model, rows, image_column, args.preprocess, args.batch_size, device, source=f"SSCD file {path}")

    if W == 1:
        emb, hit = store.get_or_compute(key, lambda: embed(dataset))
    else:
        hit = comm.broadcast_object(store.path(key).is_file())
        if hit:
            emb = store.get_or_compute(key, lambda: embed(dataset))[0] if rank == 0 else torch.zeros(0)
        else:
            n = len(dataset)
            chunk = -(-n // W)
            lo, hi = min(n, rank * chunk), min(n, (rank + 1) * chunk)
            mine = embed(dataset.select(range(lo, hi))).float().cpu() if hi > lo else torch.zeros(0, 0)
            dim = int(comm.all_reduce(torch.tensor([mine.shape[1] if len(mine) else 0]), op="max").item())
            padded = torch.zeros(chunk, dim)
            if len(mine):
                padded[: len(mine)] = mine
            emb = comm.all_gather(padded)[:n]  # rank order = row order
            if rank == 0:
                store.get_or_compute(key, lambda: emb)
    logger.info("SSCD embeddings: %s (%d images)", "cache hit" if hit else "computed and cached", len(emb))
    return emb, {"model": str(args.sscd_model), "sha256": sha, "preprocess": args.preprocess, "threshold": args.threshold, "cache_hit": hit,
                 "processes": W}


def _faiss_pairs(emb: torch.Tensor, threshold: float):
    """All pairs at inner product >= threshold by FAISS's IVF range search (approximate)."""
    import faiss

    x = np.ascontiguousarray(emb.numpy().astype(np.float32))
    nlist = max(1, int(4 * math.sqrt(len(x))))
    quantizer = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(x[np.random.default_rng(0).choice(len(x), min(len(x), 256 * nlist), replace=False)])
    index.add(x)
    index.nprobe = min(nlist, 16)
    for q0 in range(0, len(x), 65536):
        lims, sims, ids = index.range_search(x[q0 : q0 + 65536], threshold)
        for r in range(len(lims) - 1):
            i = q0 + r
            js = ids[lims[r] : lims[r + 1]]
            ss = sims[lims[r] : lims[r + 1]]
            keep = js != i  # both directions: IVF may find a pair from one side only
            if keep.any():
                yield np.full(int(keep.sum()), i), js[keep].astype(np.int64), ss[keep].astype(np.float32)


def faiss_recall(emb: torch.Tensor, threshold: float, pairs_of: dict[int, set[int]], sample: int = RECALL_SAMPLE, seed: int = 0) -> tuple[float | None, int]:
    """Fraction of the exact search's pairs (of ``sample`` seeded rows, against every row) that
    the approximate search found; None when the sampled rows have no exact pair.

    Args:
        pairs_of: row -> the rows the approximate search linked it to (both directions).
    """
    rows = np.sort(np.random.default_rng(seed).choice(len(emb), min(sample, len(emb)), replace=False))
    want = got = 0
    for r in rows.tolist():
        sims = emb @ emb[r]
        sims[r] = -2.0
        exact = set(torch.nonzero(sims >= threshold).flatten().tolist())
        want += len(exact)
        got += len(exact & pairs_of.get(r, set()))
    return (got / want if want else None), len(rows)


def run_audit(dataset, image_column: str, caption_column: str, args, paths: list[str | None] | None = None,
              embeddings: tuple[torch.Tensor, dict] | None = None) -> dict:
    """Audit a loaded, checked dataset; returns what ``audit.json`` holds.

    Args:
        dataset: a ``datasets.Dataset`` as ``load_image_caption_dataset`` returns it.
        args: ``parse_args``'s namespace (thresholds, SSCD settings).
        paths: each row's source file (default: read from the dataset).
        embeddings: ``_sscd_embeddings``' result when the caller computed it (with several
            processes, all of them together); computed here otherwise.
    """
    from tqdm.auto import tqdm

    from sd_memfree.scoring.generate import caption_text

    n = len(dataset)
    paths = paths if paths is not None else source_paths(dataset, image_column)
    captions = [caption_text(c) for c in dataset[caption_column]]
    fps = [duplicates.fingerprint(row[image_column]) for row in tqdm(dataset.select_columns([image_column]), total=n, desc="Fingerprints", unit="img")]
    clusters = duplicates.Clusters(n)

    # 1. Exact copies; the rest of the search sees one row of each ("representatives").
    exact_groups = duplicates.group_equal([f.pixel_sha for f in fps])
    for g in exact_groups:
        clusters.link(np.full(len(g) - 1, g[0]), np.array(g[1:]), "exact", thumb=np.zeros(len(g) - 1, np.float32),
                      hash_distance=np.zeros(len(g) - 1, np.int64))
    in_exact = {r for g in exact_groups for r in g[1:]}
    reps = np.array([i for i in range(n) if i not in in_exact], dtype=np.int64)

    # 2. Near-duplicates: thumbnail distance (exact chunked search), confirmed by the phash.
    thumbs = torch.from_numpy(np.stack([fps[i].thumb for i in reps])) if len(reps) else torch.zeros(0, duplicates.THUMB_SIDE ** 2 * 3)
    bits = np.stack([f.phash for f in fps]) if n else np.zeros((0, duplicates.HASH_BITS), bool)
    sq_limit = args.thumb_rms ** 2 * thumbs.shape[1]
    near_pairs = 0
    for qi, ki, sq in duplicates.threshold_pairs(thumbs, sq_limit, metric="sq_l2"):
        a, b = reps[qi], reps[ki]
        dist = duplicates.hamming(bits[a], bits[b])
        ok = dist <= args.hash_distance
        if ok.any():
            clusters.link(a[ok], b[ok], "near", thumb=np.sqrt(sq[ok] / thumbs.shape[1]).astype(np.float32), hash_distance=dist[ok])
            near_pairs += int(ok.sum())

    # 3. SSCD: the scorer's descriptors, exact chunked search (FAISS above --faiss_above).
    sscd_info, search_info = None, {"method": "exact", "chunk": duplicates.DEFAULT_CHUNK}
    if not args.no_sscd and len(reps) > 1:
        device = _device(args)
        emb_all, sscd_info = embeddings or _sscd_embeddings(args, dataset, image_column, device)
        emb = emb_all[torch.from_numpy(reps)]
        use_faiss = len(reps) > args.faiss_above
        if use_faiss:
            try:
                import faiss  # noqa: F401
            except ImportError:
                logger.warning("%d images > --faiss_above=%d but FAISS is not installed (pip install 'sd-memfree[faiss]'): exact search, which is slow at this size.",
                               len(reps), args.faiss_above)
                use_faiss = False
        pairs = _faiss_pairs(emb, args.threshold) if use_faiss else duplicates.threshold_pairs(emb, args.threshold, metric="dot", device=device)
        linked: dict[int, set[int]] = {}
        sscd_pairs = 0
        for qi, ki, s in pairs:
            clusters.link(reps[qi], reps[ki], "sscd", sscd=s)
            sscd_pairs += len(qi)
            if use_faiss:
                for a, b in zip(qi.tolist(), ki.tolist()):
                    linked.setdefault(a, set()).add(b)
                    linked.setdefault(b, set()).add(a)
        sscd_info["pairs"] = sscd_pairs
        if use_faiss:
            recall, sampled = faiss_recall(emb, args.threshold, linked)
            search_info = {"method": "faiss-ivf", "recall_vs_exact": recall, "recall_sample_rows": sampled}
            logger.info("FAISS recall against the exact search on %d sampled rows: %s", sampled, "n/a (no pair)" if recall is None else f"{recall:.4f}")

    # 4. Clusters, captions.
    groups = clusters.groups()
    cluster_of = np.full(n, -1, dtype=np.int64)
    for c, g in enumerate(groups):
        cluster_of[g] = c

    def row(i: int) -> dict:
        out = {"index": i, "file_name": _display_name(paths[i], i), "caption": captions[i]}
        if not math.isnan(clusters.best_sscd[i]):
            out["similarity"] = round(float(clusters.best_sscd[i]), 4)
        if not math.isnan(clusters.best_thumb[i]):
            out["thumb_rms"] = round(float(clusters.best_thumb[i]), 4)
        if clusters.best_hash[i] >= 0:
            out["hash_distance"] = int(clusters.best_hash[i])
        return out

    cluster_rows = []
    for c, g in enumerate(groups):
        kinds = sorted(set().union(*(clusters.kinds[i] for i in g)))
        sims = [float(clusters.best_sscd[i]) for i in g if not math.isnan(clusters.best_sscd[i])]
        all_exact = len({fps[i].pixel_sha for i in g}) == 1
        cluster_rows.append({
            "id": c, "size": len(g), "kind": "exact" if all_exact else "near", "links": kinds,
            "num_captions": len({duplicates.caption_key(captions[i]) for i in g}),
            "min_similarity": round(min(sims), 4) if sims else None, "rows": [row(i) for i in g],
        })
    image_id = [int(cluster_of[i]) if cluster_of[i] >= 0 else -1 - i for i in range(n)]  # singletons: their own image
    shared_captions = []
    for g in duplicates.group_equal([duplicates.caption_key(c) for c in captions]):
        images = len({image_id[i] for i in g})
        if images > 1:
            shared_captions.append({"caption": captions[g[0]], "size": len(g), "num_images": images,
                                    "rows": [{"index": i, "file_name": _display_name(paths[i], i), "cluster": int(cluster_of[i]) if cluster_of[i] >= 0 else None} for i in g]})
    shared_captions.sort(key=lambda s: (-s["num_images"], -s["size"], s["rows"][0]["index"]))
    several_captions = [{"cluster": c["id"], "size": c["size"], "captions": sorted({r["caption"] for r in c["rows"]})}
                        for c in cluster_rows if c["num_captions"] > 1]
    counts = {
        "rows": n, "clusters": len(groups), "rows_in_clusters": int(sum(len(g) for g in groups)),
        "rows_beyond_first": int(sum(len(g) - 1 for g in groups)), "exact_clusters": sum(c["kind"] == "exact" for c in cluster_rows),
        "near_pairs": near_pairs, "shared_captions": len(shared_captions), "images_with_several_captions": len(several_captions),
    }
    return {
        "version": 1, "counts": counts,
        "passes": {"exact": True, "near": {"thumb_rms": args.thumb_rms, "hash_distance": args.hash_distance, "hash": "imagehash.phash 64-bit"},
                   "sscd": sscd_info, "sscd_skipped": "--no_sscd: exact and perceptual-hash passes only" if args.no_sscd else None},
        "search": search_info, "clusters": cluster_rows, "shared_captions": shared_captions,
        "images_with_several_captions": several_captions,
    }


def _device(args) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _process_group():
    """accelerate's process state when the audit was launched as several processes (None alone)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def main(args: argparse.Namespace) -> dict:
    """Load and check the data as training does, audit it, write the outputs; returns audit.json's content."""
    from sd_memfree import audit_report, deduplicate
    from sd_memfree.data import load_image_caption_dataset

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AuditError(f"--out {out} is a file; pass a folder for {AUDIT_FILE} and {REPORT_FILE}.")
    if args.write_deduplicated:
        deduplicate.check_target(args.write_deduplicated, args.train_data_dir or args.dataset_name)
    dataset, image_column, caption_column = load_image_caption_dataset(
        dataset_name=args.dataset_name, train_data_dir=args.train_data_dir, dataset_config_name=args.dataset_config_name,
        cache_dir=args.cache_dir, image_column=args.image_column, caption_column=args.caption_column)
    if args.no_sscd:
        logger.info("--no_sscd: exact and perceptual-hash passes only; semantic near-duplicates (SSCD) are not searched.")
    else:
        from sd_memfree.scoring import sscd

        sscd.load_sscd(str(sscd.resolve_sscd_path(args.sscd_model)), "cpu")  # a missing or broken file: one line, before the work
    # Under accelerate launch / torchrun the processes embed their slices together; then the main
    # process alone searches and writes (the hash passes are cheap next to SSCD).
    state = _process_group()
    embeddings = None
    if state is not None and state.num_processes > 1 and not args.no_sscd and len(dataset) > 1:
        embeddings = _sscd_embeddings(args, dataset, image_column, state.device if args.device is None else torch.device(args.device))
    if state is not None and not state.is_main_process:
        return {}
    paths = source_paths(dataset, image_column)
    result = run_audit(dataset, image_column, caption_column, args, paths, embeddings=embeddings)
    result["data"] = {"dataset": args.dataset_name or args.train_data_dir, "image_column": image_column, "caption_column": caption_column}
    if args.write_deduplicated:
        result["deduplicated"] = deduplicate.write_deduplicated(dataset, image_column, caption_column, paths, result["clusters"],
                                                                args.write_deduplicated, args.max_copies)
    out.mkdir(parents=True, exist_ok=True)
    (out / AUDIT_FILE).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    audit_report.write_html(out / REPORT_FILE, result, lambda i: dataset[i][image_column])
    c = result["counts"]
    print(f"audit: {c['clusters']} duplicate cluster(s) holding {c['rows_in_clusters']} of {c['rows']} rows ({c['exact_clusters']} exact), "
          f"{c['shared_captions']} caption(s) shared by several images, {c['images_with_several_captions']} image(s) under several captions"
          + (" [--no_sscd: hash pass only]" if args.no_sscd else "") + f" -> {out / REPORT_FILE}")
    return result


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry: bad input ends in one line naming the problem and exit status 2."""
    from sd_memfree.data import DataError
    from sd_memfree.scoring import sscd

    args = parse_args(argv)
    try:
        main(args)
    except (DataError, AuditError, sscd.MissingWeightsError, sscd.SSCDError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()

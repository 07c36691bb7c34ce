"""The memorization scorer, top to bottom (method.md, section 5).

    python eval/score_memorization.py --model sd-private --train_data_dir ./my_images \
        --sscd_model sscd_disc_large --num_prompts 4000 --out report/

1. Check every input before the expensive work: ``--generated_dir``, the training set (with the
   training script's loader), every weights file (SSCD fetched and verified, CLIP, Inception),
   the skip counts. Bad input stops with one line (``cli``), never a traceback.
2. Sample prompts from the training captions (seed 42 by default) and generate, recording each
   generation's detection score (Wen et al.), or read ``--generated_dir``.
3. Embed training images (cached on disk) and generations with SSCD; exact chunked search.
4. Statistics, CLIP score, FID, pixel-space copy test, the detection score's summary, training
   skip counts joined to the copies; ``metrics.json``, ``report.html``, ``model_card_snippet.md``
   and ``per_image.jsonl`` in ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch

from sd_memfree.scoring import cache as cache_lib
from sd_memfree.data import add_data_arguments
from sd_memfree.safeio import replace_file
from sd_memfree.scoring import clip_score, fid, generate, metrics, report, risk, search, sscd

logger = logging.getLogger("sd_memfree.score")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Measure how much a Stable Diffusion (SD or SDXL) model reproduces its training images.")
    src = p.add_argument_group("what to score")
    src.add_argument("--model", default=None, help="StableDiffusionPipeline or StableDiffusionXLPipeline folder or Hub id to generate with (the fine-tuned model, or the base model with --lora_weights).")
    src.add_argument("--lora_weights", default=None, help="LoRA weights (folder or file) loaded with pipe.load_lora_weights on top of --model.")
    src.add_argument("--generated_dir", default=None, help="Score these images instead of generating: image files + metadata.jsonl rows {file_name, text}.")
    add_data_arguments(p, "training data (same loader as training)")
    sim = p.add_argument_group("similarity (SSCD)")
    sim.add_argument("--sscd_model", default="sscd_disc_large", help=f"SSCD TorchScript file, or a known name looked up in $SD_MEMFREE_CACHE/sscd/ and fetched there on first use ({', '.join(sscd.KNOWN_SSCD_MODELS)}).")
    sim.add_argument("--preprocess", choices=sscd.PREPROCESSINGS, default="dcr", help="dcr: resize 256, centre crop 224, mean/std 0.5 (the papers). sscd: short side 288, ImageNet normalisation (the SSCD authors).")
    sim.add_argument("--threshold", type=float, default=0.5, help="Report the fraction of generations with similarity above this (0.5 in the papers; SSCD's authors call > 0.75 a copy).")
    sim.add_argument("--num_pairs", type=int, default=16, help="Most similar generated/training pairs shown in the report.")
    sim.add_argument("--embedding_cache_dir", default=None, help="Where training-set embeddings are cached (default $SD_MEMFREE_CACHE/embeddings).")
    gen = p.add_argument_group("generation")
    gen.add_argument("--num_prompts", type=int, default=4000, help="Training captions sampled as prompts (all of them if the set is smaller).")
    gen.add_argument("--images_per_prompt", type=int, default=1)
    gen.add_argument("--num_inference_steps", type=int, default=50)
    gen.add_argument("--guidance_scale", type=float, default=7.5)
    gen.add_argument("--resolution", type=int, default=None, help="Generated image size (default: the model's own, e.g. 512 for SD 1.5, 1024 for SDXL).")
    gen.add_argument("--batch_size", type=int, default=32, help="Batch size of generation and of every embedding model.")
    gen.add_argument("--seed", type=int, default=42, help="Seeds prompt sampling; generation g uses seed + g.")
    qual = p.add_argument_group("quality")
    qual.add_argument("--clip_model", default=clip_score.DEFAULT_CLIP_MODEL, help="open_clip architecture for the CLIP score.")
    qual.add_argument("--clip_pretrained", default=clip_score.DEFAULT_CLIP_PRETRAINED, help="open_clip tag already in its cache, or a local weights file.")
    qual.add_argument("--no_clip_score", action="store_true", help="Skip the CLIP score.")
    qual.add_argument("--fid_weights", default=None, help=f"torch-fidelity Inception weights file (default: {fid.default_inception_path()}).")
    qual.add_argument("--no_fid", action="store_true", help="Skip FID.")
    qual.add_argument("--pixel_size", type=int, default=32, help="Side in pixels for the pixel-space copy test (d_min/mean(50 nearest), d1/d2 < 1/3); 0 skips it.")
    p.add_argument("--skip_counts", default=None, help=f"Training's {risk.SKIP_COUNTS_FILE} (per-sample AGC skips) to join to the copies; default: the one in --model's folder, if any.")
    p.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    p.add_argument("--out", required=True, help="Output folder: metrics.json, report.html, model_card_snippet.md, per_image.jsonl (and generated/).")
    args = p.parse_args(argv)
    if (args.model is None) == (args.generated_dir is None):
        p.error("pass exactly one of --model (generate) and --generated_dir (score existing images).")
    if args.lora_weights and not args.model:
        p.error("--lora_weights needs --model (the base model).")
    if args.dataset_name is None and args.train_data_dir is None:
        p.error("pass --dataset_name or --train_data_dir (the training data to compare against).")
    for name in ("num_pairs", "images_per_prompt", "num_inference_steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1.")
    if args.pixel_size < 0:
        p.error("--pixel_size must be >= 0.")
    # SSCD similarity is a cosine in [-1, 1]: a threshold >= 1 makes every model look clean, a
    # negative one every model look like a copier, NaN compares false everywhere.
    if not 0 <= args.threshold < 1:
        p.error(f"--threshold={args.threshold} must be a similarity in [0, 1) (0.5 in the papers, 0.75 for SSCD's copy criterion).")
    if not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        p.error(f"--guidance_scale={args.guidance_scale} must be a finite number >= 0 (7.5 is diffusers' default).")
    if args.num_prompts < 1:
        p.error(f"--num_prompts={args.num_prompts} must be >= 1.")
    if args.resolution is not None and args.resolution < 8:
        p.error(f"--resolution={args.resolution} must be >= 8 pixels (or left unset for the model's own size).")
    return args


def _pixels(images, count: int, size: int) -> np.ndarray:
    """``[count, size, size, 3]`` float32 in [0, 1]: square centre crop, bicubic resize.

    Streams ``images`` (an iterable), so only the small arrays are ever held, never the originals.
    """
    from PIL import Image

    out = np.empty((count, size, size, 3), dtype=np.float32)
    for i, im in enumerate(images):
        w, h = im.size
        s = min(w, h)
        im = im.convert("RGB").crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
        out[i] = np.asarray(im, dtype=np.float32) / 255.0
    return out


def _skip_counts_path(args) -> Path | None:
    """``--skip_counts``, else the file training wrote next to the model in ``--model``'s folder."""
    if args.skip_counts:
        path = Path(args.skip_counts)
        if not path.is_file():
            raise risk.SkipCountsError(f"--skip_counts {path}: no such file (training writes {risk.SKIP_COUNTS_FILE} in its output_dir when AGC is on).")
        return path
    for folder in (args.model, args.lora_weights):
        if folder and (Path(folder) / risk.SKIP_COUNTS_FILE).is_file():
            return Path(folder) / risk.SKIP_COUNTS_FILE
    return None


def main(args: argparse.Namespace) -> dict:
    """Score; returns the metrics written to ``<out>/metrics.json``."""
    from sd_memfree.data import DataError, load_image_caption_dataset

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)

    # 1. Every input first: bad input must stop us with one line before hours of generation.
    if args.model and not Path(args.model).expanduser().exists() and (args.model.startswith((".", "/", "~")) or args.model.count("/") != 1):
        raise sscd.MissingWeightsError(f"--model {args.model}: no such folder (pass a pipeline folder or a Hub id such as org/name).")
    pipeline_name = generate.pipeline_class_name(args.model) if args.model else None  # SD or SDXL, else one line
    records = generate.read_generated_dir(args.generated_dir) if args.generated_dir else None
    train, image_col, caption_col = load_image_caption_dataset(
        dataset_name=args.dataset_name, train_data_dir=args.train_data_dir, dataset_config_name=args.dataset_config_name,
        cache_dir=args.cache_dir, image_column=args.image_column, caption_column=args.caption_column,
    )
    if len(train) == 0:
        raise DataError(f"the training set {args.dataset_name or args.train_data_dir} has no images; pass the data the model was trained on.")
    # The pixel copy test (d1/d2) and FID compare against at least two training images: say so
    # now, not after hours of generation and embedding.
    train_px = _pixels((row[image_col] for row in train.select_columns([image_col])), len(train), args.pixel_size) if args.pixel_size else None
    distinct = len(metrics.distinct_rows(train_px)) if train_px is not None else len(train)
    needs = [what for what, on in (("the pixel copy test", bool(args.pixel_size)), ("FID", not args.no_fid)) if on]
    if needs and distinct < 2:
        off = " and ".join(f for f, on in (("--pixel_size 0", bool(args.pixel_size)), ("--no_fid", not args.no_fid)) if on)
        raise DataError(f"the training set {args.dataset_name or args.train_data_dir} has {distinct} distinct image(s) but "
                        f"{' and '.join(needs)} need at least 2; add training images or pass {off}.")
    sscd_path = sscd.resolve_sscd_path(args.sscd_model)
    sscd.load_sscd(str(sscd_path), "cpu")  # TorchScript, finite non-zero [B, D] rows on a probe batch
    if not args.no_clip_score:
        clip_score.resolve_clip_weights(args.clip_model, args.clip_pretrained)
    if not args.no_fid:
        fid.resolve_inception_weights(args.fid_weights)
    skip_path = _skip_counts_path(args)
    train_captions = [generate.caption_text(c) for c in train[caption_col]]
    skip_counts = risk.read_skip_counts(skip_path, train_captions, risk.sample_file_names(train, image_col)) if skip_path else None
    out.mkdir(parents=True, exist_ok=True)

    # 2. Generations: sampled training captions through the pipeline, or an existing folder.
    if args.generated_dir:
        gen_dir, resolution = Path(args.generated_dir), None
    else:
        prompts = generate.sample_prompts(list(train[caption_col]), args.num_prompts, args.seed)
        pipe = generate.load_pipeline(args.model, args.lora_weights, device)
        resolution = args.resolution or generate.default_resolution(pipe)  # SDXL base: 1024, SD 1.5: 512
        gen_dir = out / "generated"
        records = generate.generate_images(
            pipe, prompts, gen_dir, args.images_per_prompt, args.num_inference_steps, args.guidance_scale,
            resolution, args.batch_size, args.seed,
        )
        del pipe  # free the GPU for the embedding models
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gen_images = generate.ImageFiles(gen_dir, [r.file_name for r in records])

    # 3. SSCD embeddings. The training side is cached: keyed by model bytes, preprocessing, data.
    model = sscd.load_sscd(str(sscd_path), device)
    model_sha = sscd.file_sha256(sscd_path)
    source = f"SSCD file {sscd_path}"
    key = cache_lib.cache_key(model_sha, args.preprocess, cache_lib.dataset_fingerprint(train), image_col, len(train))
    emb_cache = cache_lib.EmbeddingCache(args.embedding_cache_dir or sscd.cache_root() / "embeddings")
    train_emb, hit = emb_cache.get_or_compute(
        key, lambda: sscd.embed_dataset_images(model, train, image_col, args.preprocess, args.batch_size, device, source=source)
    )
    logger.info("training embeddings: %s (%d images)", "cache hit" if hit else "computed and cached", len(train_emb))
    gen_emb = sscd.embed_images(model, gen_images, args.preprocess, args.batch_size, device, total=len(gen_images), desc="SSCD embed (generated)", source=source)
    del model

    # Exact search: each generation's best training match; each training image's nearest other.
    found = search.max_similarity(gen_emb, train_emb, k=1, device=device)
    background = None
    if len(train_emb) > 1:
        background, _ = emb_cache.get_or_compute(key + "-background", lambda: search.background_similarity(train_emb, k=1, device=device).best)

    gen_sim, nearest = found.best, found.indices[:, 0]
    result: dict = {
        "gen_vs_train": metrics.similarity_stats(gen_sim, args.threshold),
        "train_vs_train": metrics.similarity_stats(background, args.threshold) if background is not None else None,
        "threshold": args.threshold,
        "preprocess": args.preprocess,
        "clip_score": None,
        "fid": None,
        "pixel": None,
        "noise_magnitude": None,
        "training_risk": None,
    }
    pairs = metrics.top_matches(gen_sim, nearest, args.num_pairs)
    for p in pairs:
        p["prompt"] = records[p["generated"]].text
        p["generated_file"] = records[p["generated"]].file_name

    # 4. Quality beside memorization.
    prompts_text = [r.text for r in records]
    if not args.no_clip_score:
        scorer = clip_score.ClipScorer(args.clip_model, args.clip_pretrained, device)
        result["clip_score"] = float(clip_score.clip_scores(scorer, gen_images, prompts_text, args.batch_size).mean())
        del scorer
    if not args.no_fid:
        meter = fid.FidMeter(args.fid_weights, device)
        images = train.select_columns([image_col])
        for i in range(0, len(train), args.batch_size):
            meter.update(images[i : i + args.batch_size][image_col], real=True)
        for i in range(0, len(gen_images), args.batch_size):
            meter.update(gen_images[i : i + args.batch_size], real=False)
        result["fid"] = meter.compute()
        del meter
    pixel_per_image = None
    if args.pixel_size:
        gen_px = _pixels(iter(gen_images), len(gen_images), args.pixel_size)
        summary, pixel_per_image = metrics.pixel_copy_details(gen_px, train_px, device=device)
        result["pixel"] = {"pixel_size": args.pixel_size, **summary}

    # 5. The model-only detection score (Wen et al.), and how well it finds the pixel copies.
    magnitudes = [r.noise_magnitude for r in records]
    if all(m is not None for m in magnitudes):
        copies = pixel_per_image["copy"] if pixel_per_image is not None else None
        steps = min(generate.DETECTION_STEPS, args.num_inference_steps) if not args.generated_dir else None
        result["noise_magnitude"] = metrics.noise_magnitude_stats(np.array(magnitudes), copies, steps)

    # 6. Training-time risk: how often training skipped the images the model copies most.
    if skip_counts is not None:
        # Per training image: the closest any generation comes to it (SSCD, and pixels if measured).
        reverse = search.topk_search(train_emb, gen_emb, k=1, metric="dot", device=device).best.numpy()
        pixel_distance = None
        if args.pixel_size:
            pixel_distance = (-search.topk_search(torch.from_numpy(train_px.reshape(len(train_px), -1)), torch.from_numpy(gen_px.reshape(len(gen_px), -1)),
                                                  k=1, metric="neg_sq_l2", device=device).best).double().numpy()
        result["training_risk"] = {"skip_counts_file": str(skip_path), **risk.risk_table(skip_counts, reverse, train_captions, args.num_pairs, pixel_distance)}

    result["top_matches"] = pairs
    result["run"] = {
        "model": args.model, "pipeline": pipeline_name, "lora_weights": args.lora_weights, "generated_dir": str(gen_dir),
        "dataset": args.dataset_name or args.train_data_dir, "num_train": len(train), "num_generated": len(records),
        "images_per_prompt": args.images_per_prompt if not args.generated_dir else None,
        "num_inference_steps": args.num_inference_steps if not args.generated_dir else None,
        "guidance_scale": args.guidance_scale if not args.generated_dir else None,
        "resolution": resolution, "seed": args.seed, "sscd_model": str(args.sscd_model), "sscd_sha256": model_sha,
        "clip_model": None if args.no_clip_score else f"{args.clip_model}/{Path(args.clip_pretrained).name}",
        "embedding_cache_hit": hit, "device": str(device),
    }

    # 7. Outputs.
    lines = []
    for g, (r, s, n) in enumerate(zip(records, gen_sim.tolist(), nearest.tolist())):
        row = {"file_name": r.file_name, "text": r.text, "similarity": s, "train_index": n, "noise_magnitude": r.noise_magnitude}
        if pixel_per_image is not None:
            row.update(pixel_copy=bool(pixel_per_image["copy"][g]), pixel_d1_d2=float(pixel_per_image["d1"][g] / max(pixel_per_image["d2"][g], 1e-12)),
                       pixel_nearest=int(pixel_per_image["nearest"][g]))
        lines.append(json.dumps(row) + "\n")
    replace_file(out / "per_image.jsonl", "".join(lines))  # outputs are replaced, never written through a link
    report.write_metrics_json(out / "metrics.json", result)
    pair_images = [(gen_images[p["generated"]], train[p["train"]][image_col]) for p in pairs]
    risk_images = [train[row["train"]][image_col] for row in result["training_risk"]["most_copied"]] if result["training_risk"] else []
    report.write_html(out / "report.html", result, gen_sim, background, pairs, pair_images,
                      magnitudes=magnitudes if result["noise_magnitude"] else None,
                      copies=pixel_per_image["copy"] if pixel_per_image is not None else None, risk_images=risk_images)
    replace_file(out / "model_card_snippet.md", report.model_card_snippet(result))
    g = result["gen_vs_train"]
    logger.info("sim_95pc=%.4f mean=%.4f %s=%.4f -> %s", g["sim_95pc"], g["mean"], metrics.threshold_key(args.threshold), g[metrics.threshold_key(args.threshold)], out)
    return result


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry: bad input ends in one line naming the problem and exit status 2."""
    from sd_memfree.data import DataError

    args = parse_args(argv)
    try:
        main(args)
    except (DataError, sscd.MissingWeightsError, sscd.SSCDError, generate.GeneratedDirError, generate.ModelError, risk.SkipCountsError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

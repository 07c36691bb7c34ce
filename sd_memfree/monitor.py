"""A held-out denoising loss in every run, beside the same loss on the training rows most at risk.

Memorization shows in the losses before it shows in generations: plain fine-tuning keeps
lowering its loss on duplicated training images while the loss on images it never trained on
stalls (docs/memorization_benchmark.md). This module gives a training script that signal:

- ``add_arguments``: ``--heldout_data_dir`` / ``--heldout_fraction``, ``--monitor_samples``,
  ``--audit_file``;
- ``split_heldout``: called on the checked dataset before training sees it; it removes the
  held-out rows (``--heldout_fraction``, chosen by seed) and names the at-risk training rows (the
  rows of ``sd-memfree audit``'s duplicate clusters, else the rows whose caption repeats);
- Off unless a held-out set is given (``--heldout_data_dir`` or ``--heldout_fraction``): a run
  without one trains on the same rows with the same draws as before; pass one in every run.
- ``HeldOutMonitor``: the epsilon (or v) prediction MSE of both sets at fixed timesteps with fixed
  noise, every ``--checkpointing_steps`` and at the end; logged as ``monitor/heldout_loss`` and
  ``monitor/at_risk_loss``, written to ``monitor.json`` (local: it names training files), the
  run's summary and the model card (a table and ``monitor_curve.png``).

Invariants:
- A held-out row never reaches training: ``split_heldout`` returns the training dataset without
  it (``Split.train_rows`` maps each training sample id to its row in the loaded dataset, and
  no held-out row is among them). ``--heldout_fraction`` never holds out an at-risk row (one in
  an audit cluster or with a repeated caption): its copies would stay in training and the
  "held-out" loss would measure memorization instead.
- The loss is a function of the weights only: latents are the VAE posterior means of the
  centre-cropped images, the noise of timestep ``t`` is drawn for all rows of a set at once from
  a CPU generator seeded ``NOISE_SEED`` (timesteps in ``TIMESTEPS`` order), so two evaluations
  of the same weights give the same number, on any process count (the same quantity as the
  benchmark's ``memorization_eval.denoising_loss``).
- Only the main process evaluates (no collective): the other processes hold an inactive
  monitor. With shard proxies the evaluated weights are the last merge's (what a checkpoint
  publishes), passed in, never the live proxy's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

TIMESTEPS = tuple(range(50, 1000, 100))  # the memorization benchmark's: 10 timesteps across the schedule
NOISE_SEED = 1234
MONITOR_FILE = "monitor.json"  # in output_dir; local only (it names training files)
CURVE_FILE = "monitor_curve.png"  # shown in the model card (a loss curve, no training image)
DEFAULT_SAMPLES = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The monitor's flags, in one group."""
    g = parser.add_argument_group("held-out monitor (sd_memfree.monitor)")
    g.add_argument("--heldout_data_dir", default=None,
                   help="Images never trained on (imagefolder, same --image_column/--caption_column): their denoising loss is logged as monitor/heldout_loss.")
    g.add_argument("--heldout_fraction", type=float, default=None,
                   help="Instead of --heldout_data_dir: keep this fraction of the training rows (chosen by --seed) out of training and use them.")
    g.add_argument("--monitor_samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"Rows of each set (held-out, at-risk) evaluated, x {len(TIMESTEPS)} fixed timesteps, every --checkpointing_steps and at the end.")
    g.add_argument("--monitor_batch_size", type=int, default=None,
                   help="Rows per UNet call when evaluating (default --train_batch_size, which fits: evaluation keeps no gradients).")
    g.add_argument("--audit_file", default=None,
                   help="audit.json from `sd-memfree audit` on this data: its duplicate clusters are the at-risk rows (default: rows whose caption repeats).")


class MonitorError(ValueError):
    """Bad monitor settings, reported in one line before any model loads."""


@dataclass
class Split:
    """What ``split_heldout`` decided: row numbers refer to the dataset as loaded and checked."""

    train_rows: list[int]  # training sample id -> loaded row
    heldout: object | None = None  # a datasets.Dataset, or None (monitor off)
    heldout_source: str = ""
    heldout_rows: list[int] = field(default_factory=list)  # loaded rows held out (--heldout_fraction)
    at_risk: list[int] = field(default_factory=list)  # training sample ids
    at_risk_source: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    train: object | None = None  # the training dataset (after the split): where the at-risk rows are
    loaded: object | None = None  # the dataset as loaded and checked (before the split): what the scorer is given


def _check(args) -> None:
    f = args.heldout_fraction
    if f is not None and args.heldout_data_dir is not None:
        raise MonitorError("pass --heldout_data_dir or --heldout_fraction, not both.")
    if f is not None and not 0 < f < 1:
        raise MonitorError(f"--heldout_fraction={f} must be in (0, 1), e.g. 0.05.")
    if args.monitor_samples < 1:
        raise MonitorError(f"--monitor_samples={args.monitor_samples} must be >= 1.")
    if getattr(args, "monitor_batch_size", None) is not None and args.monitor_batch_size < 1:
        raise MonitorError(f"--monitor_batch_size={args.monitor_batch_size} must be >= 1.")
    if args.audit_file is not None and f is None and args.heldout_data_dir is None:
        raise MonitorError("--audit_file applies with a held-out set: add --heldout_data_dir DIR or --heldout_fraction F.")
    if args.audit_file is not None and not Path(args.audit_file).is_file():
        raise MonitorError(f"--audit_file {args.audit_file}: no such file; run `sd-memfree audit --out DIR` on this data and pass DIR/audit.json.")


def heldout_rows(num_rows: int, fraction: float, seed: int, exclude=()) -> list[int]:
    """``round(fraction * num_rows)`` rows (at least 1, at most ``num_rows - 1``), chosen by ``seed``
    among the rows not in ``exclude`` (a held-out copy of a training image would not be held out),
    ascending; fewer when fewer are eligible."""
    skip = set(exclude)
    candidates = [i for i in range(num_rows) if i not in skip]
    k = min(num_rows - 1, len(candidates), max(1, round(fraction * num_rows)))
    return sorted(random.Random(seed).sample(candidates, k))


def _file_names(dataset, image_column: str) -> list[str | None]:
    from sd_memfree.run.skipcounts import sample_file_names

    return sample_file_names(dataset, image_column)


def _audit_rows(path: str, loaded_names: list[str | None], num_loaded: int) -> list[int]:
    """Loaded rows in the audit's clusters: matched by file name when every row has one, else by index."""
    try:
        clusters = json.loads(Path(path).read_text(encoding="utf-8"))["clusters"]
        rows = [(r["index"], r["file_name"]) for c in clusters for r in c["rows"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MonitorError(f"--audit_file {path} is not an audit.json from `sd-memfree audit` ({type(e).__name__}); run the audit again.") from None
    if all(loaded_names) and len(set(loaded_names)) == len(loaded_names):  # names identify rows (not so across subfolders)
        where = {n: i for i, n in enumerate(loaded_names)}
        missing = [n for _, n in rows if n not in where]
        if missing:
            raise MonitorError(f"--audit_file {path} lists {missing[0]} (and {len(missing) - 1} more), not in the training data: audit this data again.")
        return sorted({where[n] for _, n in rows})
    if any(i >= num_loaded for i, _ in rows):
        raise MonitorError(f"--audit_file {path} has rows beyond the {num_loaded} training rows: audit this data again.")
    return sorted({i for i, _ in rows})


def split_heldout(args, dataset, image_column: str, caption_column: str):
    """Take the held-out rows out of ``dataset`` and choose the at-risk rows.

    Returns:
        ``(train_dataset, Split)``: ``dataset`` itself when nothing is held out of it.

    Raises:
        MonitorError, DataError: bad settings or a bad held-out set (one line, before any model loads).
    """
    from sd_memfree.data import load_image_caption_dataset
    from sd_memfree.duplicates import caption_key, group_equal
    from sd_memfree.data import caption_text

    _check(args)
    n = len(dataset)
    split = Split(train_rows=list(range(n)), image_column=image_column, caption_column=caption_column, loaded=dataset)
    if args.heldout_fraction is None and args.heldout_data_dir is None:
        return dataset, split  # monitor off: the run trains exactly as without this module
    names = _file_names(dataset, image_column)
    if args.audit_file:
        risky_loaded, split.at_risk_source = _audit_rows(args.audit_file, names, n), f"audit clusters ({Path(args.audit_file).name})"
    else:
        captions = [caption_key(caption_text(c)) for c in dataset[caption_column]]
        risky_loaded = sorted(i for g in group_equal(captions) for i in g)
        split.at_risk_source = "rows whose caption repeats" if risky_loaded else None
    if args.heldout_fraction is not None:
        if n - len(risky_loaded) < 1 or n < 2:
            raise MonitorError(f"--heldout_fraction needs a training row that is not a duplicate to hold out; the data has {n} rows, "
                               f"{len(risky_loaded)} of them duplicated: pass --heldout_data_dir instead.")
        held = heldout_rows(n, args.heldout_fraction, args.seed if args.seed is not None else 0, exclude=risky_loaded)
        held_set = set(held)
        split.train_rows = [i for i in range(n) if i not in held_set]
        split.heldout, split.heldout_rows = dataset.select(held), held
        split.heldout_source = f"--heldout_fraction={args.heldout_fraction}: {len(held)} of {n} rows"
        dataset = dataset.select(split.train_rows)
    elif args.heldout_data_dir is not None:
        split.heldout, _, _ = load_image_caption_dataset(train_data_dir=args.heldout_data_dir, image_column=image_column, caption_column=caption_column)
        split.heldout_source = f"--heldout_data_dir={Path(args.heldout_data_dir).name}: {len(split.heldout)} rows"
    split.train = dataset
    position = {row: sid for sid, row in enumerate(split.train_rows)}
    split.at_risk = [position[r] for r in risky_loaded if r in position]  # all of them: held-out rows are chosen among the others
    return dataset, split


def sample(rows: list[int], k: int, seed: int) -> list[int]:
    """All of ``rows`` when there are at most ``k``, else ``k`` of them chosen by ``seed``, ascending."""
    return list(rows) if len(rows) <= k else sorted(random.Random(seed).sample(list(rows), k))


class HeldOutMonitor:
    """Evaluates the held-out and at-risk losses of the UNet (main process only).

    Args:
        split: ``split_heldout``'s result.
        args: the script's arguments (``resolution``, ``image_interpolation_mode``,
            ``monitor_batch_size`` or else ``train_batch_size``, ``monitor_samples``, ``seed``).
        unet, vae, text_encoder, tokenizer, scheduler: the run's models (the UNet as prepared). For
            SDXL pass both text encoders and both tokenizers as sequences: the conditioning is
            then upstream's (both penultimate hidden states, the second's pooled embedding) with
            the size/crop ``time_ids`` of an image given at ``--resolution`` uncropped.
        accelerator: the run's ``Accelerator`` (device, autocast, trackers, main process).
        step: optimizer steps already taken (a resumed run keeps the curve before it).
        output_dir: where ``monitor.json`` is read (resume) and written.
    """

    def __init__(self, split: Split, args, *, unet, vae, text_encoder, tokenizer, scheduler, accelerator, step: int, output_dir):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.split = split
        self.active = accelerator.is_main_process and split.heldout is not None
        self.curve: list[dict] = []
        self.sets: dict[str, dict] = {}
        if not self.active:
            return
        self.scheduler = scheduler
        self.resolution = args.resolution
        self.batch = getattr(args, "monitor_batch_size", None) or max(1, args.train_batch_size)
        seed = args.seed if args.seed is not None else 0
        from sd_memfree.data import build_image_transforms

        geometric, to_tensor = build_image_transforms(args.resolution, True, False, getattr(args, "image_interpolation_mode", "lanczos"))
        for name, ds, rows, source in (("heldout", split.heldout, None, split.heldout_source),
                                       ("at_risk", split.train, split.at_risk, split.at_risk_source)):
            if ds is None or (rows is not None and not rows):
                continue
            picked = sample(range(len(ds)) if rows is None else rows, args.monitor_samples, seed)
            self.sets[name] = {"source": source, "rows": len(ds) if rows is None else len(rows), "evaluated": len(picked),
                               "files": [f for f in _file_names(ds.select(picked), split.image_column)],
                               **self._encode(ds.select(picked), geometric, to_tensor, vae, text_encoder, tokenizer)}
        if step > 0:  # a resumed run: the curve up to its checkpoint
            previous = self.output_dir / MONITOR_FILE
            if previous.is_file():
                self.curve = [p for p in json.loads(previous.read_text())["curve"] if p["step"] <= step]
        if not self.curve or self.curve[-1]["step"] != step:
            self.evaluate(step, unet)

    @torch.no_grad()
    def _encode(self, ds, geometric, to_tensor, vae, text_encoder, tokenizer) -> dict:
        """Latents (posterior means, scaled) and text conditioning of a set, kept on the CPU."""
        from sd_memfree.data import caption_text

        dev = self.accelerator.device
        images = ds[self.split.image_column]
        x = torch.stack([to_tensor(geometric(im.convert("RGB"))) for im in images])
        captions = [caption_text(c) for c in ds[self.split.caption_column]]
        sdxl = isinstance(text_encoder, (list, tuple))
        encoders, tokenizers = (text_encoder, tokenizer) if sdxl else ([text_encoder], [tokenizer])
        ids = [t(captions, max_length=t.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids for t in tokenizers]
        lat, txt, pooled = [], [], []
        for i in range(0, len(x), self.batch):
            lat.append(vae.encode(x[i : i + self.batch].to(dev, vae.dtype)).latent_dist.mode().float().cpu() * vae.config.scaling_factor)
            if sdxl:  # upstream's encode_prompt: penultimate hidden states of both, the second's pooled embedding
                outs = [e(d[i : i + self.batch].to(dev), output_hidden_states=True) for e, d in zip(encoders, ids)]
                txt.append(torch.cat([o.hidden_states[-2] for o in outs], dim=-1).cpu())
                pooled.append(outs[-1].text_embeds.cpu())
            else:
                txt.append(encoders[0](ids[0][i : i + self.batch].to(dev), return_dict=False)[0].cpu())
        return {"latents": torch.cat(lat), "text": torch.cat(txt), **({"pooled": torch.cat(pooled)} if sdxl else {})}

    @torch.no_grad()
    def loss(self, unet, name: str, trainable: list[torch.Tensor] | None = None) -> float:
        """Mean per-sample loss of set ``name`` over its rows x ``TIMESTEPS``.

        Args:
            trainable: values for the UNet's trainable parameters (the last merge's, with shard
                proxies), in ``named_parameters`` order; default: the live ones.
        """
        from sd_memfree.method.losses import per_sample_loss

        s = self.sets[name]
        dev = self.accelerator.device
        module = self.accelerator.unwrap_model(unet)
        dtype = next(module.parameters()).dtype
        override = None
        if trainable is not None:
            names = [n for n, p in module.named_parameters() if p.requires_grad]
            shapes = dict(module.named_parameters())
            override = {n: v.view(shapes[n].shape).to(dev, shapes[n].dtype) for n, v in zip(names, trainable, strict=True)}
        was_training = module.training
        module.eval()
        gen = torch.Generator().manual_seed(NOISE_SEED)
        lat, text = s["latents"], s["text"]
        total, count = torch.zeros((), dtype=torch.float64, device=dev), 0
        try:
            for t in TIMESTEPS:
                noise = torch.randn(lat.shape, generator=gen)  # the whole set at once: independent of the eval batch
                for i in range(0, len(lat), self.batch):
                    z, eps = lat[i : i + self.batch].to(dev), noise[i : i + self.batch].to(dev)
                    tt = torch.full((len(z),), t, dtype=torch.long, device=dev)
                    noisy = self.scheduler.add_noise(z, eps, tt)
                    target = eps if self.scheduler.config.prediction_type == "epsilon" else self.scheduler.get_velocity(z, eps, tt)
                    inputs = (noisy.to(dtype), tt, text[i : i + self.batch].to(dev, dtype))
                    kwargs = {"return_dict": False}
                    if "pooled" in s:  # SDXL: an image given at --resolution, uncropped (the pipeline's default)
                        r = self.resolution
                        kwargs["added_cond_kwargs"] = {"text_embeds": s["pooled"][i : i + self.batch].to(dev, dtype),
                                                       "time_ids": torch.tensor([[r, r, 0, 0, r, r]], device=dev, dtype=dtype).expand(len(z), 6)}
                    with self.accelerator.autocast() if self.accelerator.mixed_precision != "no" else nullcontext():
                        if override is None:
                            pred = module(*inputs, **kwargs)[0]
                        else:
                            pred = torch.func.functional_call(module, override, inputs, kwargs, strict=False)[0]
                    total += per_sample_loss(pred, target).double().sum()
                    count += len(z)
        finally:
            module.train(was_training)
        return float(total) / count

    def evaluate(self, step: int, unet, trainable: list[torch.Tensor] | None = None) -> dict:
        """Both losses at ``step``: logged to the trackers, added to the curve and ``monitor.json``.

        Returns:
            ``{"monitor/heldout_loss", "monitor/at_risk_loss"}`` (those that exist); ``{}`` on the
            processes that do not evaluate.
        """
        if not self.active:
            return {}
        point = {"step": int(step)}
        for name in self.sets:
            point[f"{name}_loss"] = self.loss(unet, name, trainable)
        logs = {f"monitor/{k}": v for k, v in point.items() if k != "step"}
        self.accelerator.log(logs, step=int(step))
        self.curve = [p for p in self.curve if p["step"] != step] + [point]
        self.write()
        return logs

    def write(self) -> Path:
        """``monitor.json`` (atomically): the sets (sizes, sources, evaluated files) and the curve."""
        sets = {k: {kk: vv for kk, vv in v.items() if kk not in ("latents", "text", "pooled")} for k, v in self.sets.items()}
        doc = {"version": 1, "timesteps": list(TIMESTEPS), "noise_seed": NOISE_SEED, "sets": sets, "heldout_rows_of_training_data": self.split.heldout_rows,
               "curve": self.curve}
        tmp = self.output_dir / (MONITOR_FILE + ".partial")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.output_dir / MONITOR_FILE)
        return self.output_dir / MONITOR_FILE

    def finish(self, step: int, unet) -> dict:
        """The end of the run (main process, after the final merge): evaluate unless this step
        already was, draw the curve; returns the summary's ``monitor/*`` values (last point)."""
        if not self.active:
            return {}
        if not self.curve or self.curve[-1]["step"] != step:
            self.evaluate(step, unet)
        self.draw()
        return {f"monitor/{k}": v for k, v in self.curve[-1].items() if k != "step"}

    def draw(self) -> Path:
        """``monitor_curve.png``: both losses against the optimizer step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        steps = [p["step"] for p in self.curve]
        for key, label, colour in (("heldout_loss", "held-out rows", "tab:blue"), ("at_risk_loss", "at-risk training rows", "tab:red")):
            if key in self.curve[-1]:
                ax.plot(steps, [p[key] for p in self.curve], "o-", color=colour, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("denoising loss (fixed noise, timesteps)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = self.output_dir / CURVE_FILE
        fig.savefig(path)
        plt.close(fig)
        return path

    def card_section(self) -> str:
        """The model card's section for this run (``card_section`` of its ``monitor.json``)."""
        return card_section(self.output_dir) if self.active else ""


def card_section(output_dir) -> str:
    """Markdown for the model card from ``output_dir/monitor.json`` (empty when there is none):
    the curve's table and picture, and how to read the gap. ``sd-memfree card`` rewrites the card
    with it too, so adding scores does not drop it."""
    path = Path(output_dir) / MONITOR_FILE
    if not path.is_file():
        return ""
    doc = json.loads(path.read_text())
    curve, sets = doc["curve"], doc["sets"]
    if not curve:
        return ""
    has_risk = "at_risk_loss" in curve[-1]
    lines = ["## Held-out loss during training", "",
             f"Denoising loss at {len(doc['timesteps'])} fixed timesteps with fixed noise on {sets.get('heldout', {}).get('evaluated', 0)} held-out images"
             + (f" and on {sets['at_risk']['evaluated']} training images most at risk of being copied ({sets['at_risk']['source']})" if has_risk else "")
             + ". A held-out loss that stalls while the at-risk loss keeps falling is the early sign of memorization.", "",
             "| step | held-out | at-risk | gap |", "|---|---|---|---|"]

    def cell(v):
        return "-" if v is None else f"{v:.4f}"

    for p in curve:
        h, r = p.get("heldout_loss"), p.get("at_risk_loss")
        lines.append(f"| {p['step']} | {cell(h)} | {cell(r)} | {cell(h - r) if h is not None and r is not None else '-'} |")
    if (Path(output_dir) / CURVE_FILE).is_file():
        lines += ["", f"![held-out loss](./{CURVE_FILE})"]
    return "\n".join(lines) + "\n"

"""Model card and Hub upload for a model trained with sd_memfree.

The card says which mitigation was on (IET-AGC / IET-AGC+, with the settings that were used), how
memorization was scored (or how to score it), how to load the model, and the key training settings.
The upload sends an allow-list (:func:`upload_allow_patterns`): the model, the card and the
images it shows, ``memfree_config.json``. Everything else in ``output_dir`` stays local.

Invariants:
    - :func:`files_to_upload` filters with ``huggingface_hub.utils.filter_repo_objects`` with the
      same allow and ignore patterns that :func:`push_to_hub` passes to ``HfApi.upload_folder``
      (plus huggingface_hub's defaults, which ``upload_folder`` adds), so it lists exactly what
      is sent.
    - The card names no local path: a local base model, dataset or scorer file appears by its
      folder or file name only; no secret (``SECRET_ARGS``) is ever written.
    - Nothing here touches the network unless :func:`push_to_hub` is called with a real ``HfApi``.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, HFValidationError, filter_repo_objects, validate_repo_id

from .safeio import replace_file

PAPER_IET_AGC = "https://arxiv.org/abs/2407.15328"
PAPER_IET_AGC_PLUS = "https://arxiv.org/abs/2502.09434"

_BASE_TAGS = (
    "stable-diffusion",
    "stable-diffusion-diffusers",
    "text-to-image",
    "diffusers",
    "diffusers-training",
    "sd-memfree",
    "iet-agc",
    "memorization-mitigation",
)

# Scores the scorer reports (method.md, section 5), in display order, with what each one means.
# Unknown numeric keys are still shown, after these, so a new scorer metric is never hidden.
_SCORE_DESCRIPTIONS = {
    "sim_mean": "mean SSCD similarity of a generation to its nearest training image (lower is better)",
    "sim_75pc": "75th percentile of that similarity (lower is better)",
    "sim_90pc": "90th percentile of that similarity (lower is better)",
    "sim_95pc": "95th percentile of that similarity: the papers' similarity score (lower is better)",
    "frac_gt_0.5": "fraction of generations with similarity > 0.5 (lower is better)",
    "copy_rate": "fraction of generations judged copies of a training image (lower is better)",
    "clip_score": "CLIP ViT-B/16 image-caption cosine similarity (higher is better)",
    "fid": "FID of generations vs the training images (lower is better)",
}
# How the scores were obtained; shown as settings, not as scores, even when numeric.
_SCORER_SETTINGS = ("sscd_model", "preprocess", "num_prompts", "seed", "num_inference_steps", "guidance_scale")

_KEY_TRAINING_ARGS = (
    "learning_rate",
    "max_train_steps",
    "train_batch_size",
    "gradient_accumulation_steps",
    "resolution",
    "mixed_precision",
    "lr_scheduler",
    "seed",
)


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    # The scorer may nest statistics (e.g. the train-vs-train background); show them as "a/b"
    # ("/" because metric names themselves contain dots, like frac_gt_0.5).
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}/"))
        else:
            flat[name] = value
    return flat


def _public_value(value: Any) -> Any:
    """A scorer setting as the card may show it: a path that is not a Hub id becomes its last part."""
    if isinstance(value, str) and (os.sep in value or "/" in value) and _hub_id_or_none(value) is None:
        return Path(value).name
    return value


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def memorization_section(
    metrics: Mapping[str, Any] | None,
    *,
    model: str = "<output_dir>",
    train_data_dir: str = "<train_data_dir>",
    lora_weights: str | None = None,
    dataset_name: str | None = None,
) -> str:
    """The model card's memorization section (markdown, starting with a ``##`` heading).

    Args:
        metrics: the scorer's report: scores (``sim_mean``, ``sim_95pc``, ``frac_gt_0.5``,
            ``clip_score``, ``fid``, ``copy_rate``, ...) and its settings (``sscd_model``,
            ``preprocess``, ``num_prompts``, ...); nested dicts are shown as ``group/name``.
            None (or empty) when the model has not been scored.
        model: what ``--model`` is in the scoring command shown when unscored.
        train_data_dir: what ``--train_data_dir`` is in that command.
        lora_weights: ``--lora_weights`` of that command (LoRA models), or None.
        dataset_name: a Hub dataset: the command uses ``--dataset_name`` instead.

    Returns:
        A table of the scores and a list of the scorer settings, or, when unscored, a line
        saying so and the exact command to score the model. The scorer's ``top_matches`` (training
        captions, file names) and other lists are left out; local paths appear as their last part.
    """
    lines = ["## Memorization", ""]
    if not metrics:
        weights = f" --lora_weights {lora_weights}" if lora_weights else ""
        data = f"--dataset_name {dataset_name}" if dataset_name else f"--train_data_dir {train_data_dir}"
        lines += [
            "This model has not been scored for memorization yet. Score it with:",
            "",
            "```bash",
            f"sd-memfree score --model {model}{weights} {data} "
            "--sscd_model sscd_disc_large --out report/",
            "```",
        ]
        return "\n".join(lines) + "\n"

    flat = {k: _public_value(v) for k, v in _flatten(metrics).items() if not isinstance(v, (list, tuple))}
    settings = {
        k: v
        for k, v in flat.items()
        if k.rsplit("/", 1)[-1] in _SCORER_SETTINGS or isinstance(v, bool) or not isinstance(v, int | float)
    }
    scores = {k: v for k, v in flat.items() if k not in settings}
    ordered = [k for k in _SCORE_DESCRIPTIONS if k in scores] + [k for k in scores if k not in _SCORE_DESCRIPTIONS]

    lines += [
        "Each generation is compared with every training image; its similarity is the highest "
        "SSCD cosine similarity (protocol of Somepalli et al. 2023, used by the IET-AGC papers).",
        "",
        "| metric | value | meaning |",
        "|---|---|---|",
    ]
    for key in ordered:
        group, _, leaf = key.rpartition("/")
        meaning = _SCORE_DESCRIPTIONS.get(key, "") if not group else f"`{leaf}` for {group}"
        lines.append(f"| `{key}` | {_format(scores[key])} | {meaning} |")
    if settings:
        lines += ["", "Scored with:", ""]
        lines += [f"- `{key}`: {_format(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def _method_description(cfg: Mapping[str, Any]) -> str:
    """Which mitigation was on and with what settings; off means the same as in MemFreeConfig."""
    num_shards = int(cfg.get("num_shards", 1))
    agc_ratio = float(cfg.get("agc_ratio", 0.0))
    fraction = float(cfg.get("redistribute_fraction", 0.0))
    augmentation = bool(cfg.get("loss_aware_augmentation", False))

    if fraction > 0 or augmentation:
        name = "IET-AGC+"
    elif num_shards > 1 and agc_ratio > 0:
        name = "IET-AGC"
    elif num_shards > 1:
        name = "IET (shard proxies, no AGC)"
    elif agc_ratio > 0:
        name = "AGC only (one shard)"
    else:
        name = None

    lines = ["## Memorization mitigation", ""]
    if name is None:
        lines.append(
            "No mitigation was enabled: this is a plain diffusers fine-tune (one shard, no AGC), "
            "trained with the sd-memfree script."
        )
    else:
        lines.append(
            f"Fine-tuned with **{name}** to lower the chance that the model reproduces its training "
            f"images ([IET-AGC]({PAPER_IET_AGC}), [IET-AGC+]({PAPER_IET_AGC_PLUS})):"
        )
        lines.append("")
        if num_shards > 1:
            lines.append(
                f"- **Shard proxies, merged**: the training set was split into {num_shards} shards; one "
                f"proxy (a copy of the trainable weights) learnt from each shard, and every "
                f"{cfg.get('merge_every')} local optimizer steps the proxies were merged (mean of their "
                "weights, weighted by shard size). The released weights are the merged weights."
            )
        if agc_ratio > 0:
            lines.append(
                f"- **AGC (anti-gradient control)**: a sample was skipped when {agc_ratio:g} x its loss fell "
                "below its proxy's running mean loss at that timestep (the loss bank, decay "
                f"{cfg.get('agc_ema')}), i.e. when the proxy had started to memorize it."
            )
        if fraction > 0:
            lines.append(
                f"- **Redistribution** ({cfg.get('redistribute_at')}): each shard moved up to {fraction:.0%} "
                "of its samples, the ones AGC skipped most often, to the next shard, so their content "
                "is learnt by a proxy that has not memorized them."
            )
        if augmentation:
            lines.append(
                "- **Loss-aware augmentation**: kept samples whose loss lay just above the skip "
                "threshold were augmented more strongly (RandAugment, magnitude up to "
                f"{cfg.get('augment_max_magnitude')}, alpha {cfg.get('augment_alpha')})."
            )
    lines += ["", "All mitigation settings:", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{key}` | {_format(value)} |" for key, value in cfg.items()]
    return "\n".join(lines) + "\n"


def _usage(repo_id: str, base_model: str, is_lora: bool) -> str:
    if is_lora:
        code = (
            "import torch\n"
            "from diffusers import StableDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")\n'
            f'pipe.load_lora_weights("{repo_id}")\n'
            'image = pipe("a photo of a cat").images[0]\n'
        )
    else:
        code = (
            "import torch\n"
            "from diffusers import StableDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_pretrained("{repo_id}", torch_dtype=torch.float16).to("cuda")\n'
            'image = pipe("a photo of a cat").images[0]\n'
        )
    return f"## How to use\n\n```python\n{code}```\n"


def _training_section(training_args: Mapping[str, Any], is_lora: bool) -> str:
    keys = list(_KEY_TRAINING_ARGS) + (["rank"] if is_lora else [])
    rows = [f"| `{k}` | {_format(training_args[k])} |" for k in keys if training_args.get(k) is not None]
    return "\n".join(["## Training settings", "", "| setting | value |", "|---|---|", *rows]) + "\n"


def _hub_id_or_none(name: str | None) -> str | None:
    # The Hub rejects card metadata that names a local folder as base_model / dataset, which
    # would fail the upload after training; such names stay in the card's text only.
    if name is None or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    repo_id: str,
    base_model: str,
    method_config: Mapping[str, Any],
    training_args: Mapping[str, Any],
    is_lora: bool,
    metrics: Mapping[str, Any] | None = None,
    images: Sequence[Any] | None = None,
    dataset: str | None = None,
    extra_sections: Sequence[str] = (),
) -> Path:
    """Write ``output_dir/README.md``: YAML metadata and a card describing the run.

    The card is built directly rather than with diffusers' ``load_or_create_model_card``: that
    helper first downloads the repo's existing card and returns it unchanged when there is one,
    which would keep stale scores, and it needs the network. diffusers' ``populate_model_card``
    adds the tags, as in the diffusers training scripts.

    Args:
        output_dir: the run's output folder.
        repo_id: the Hub repository the model is (or will be) pushed to.
        base_model: ``--pretrained_model_name_or_path``.
        method_config: the mitigation settings (``dataclasses.asdict(MemFreeConfig)``).
        training_args: the script's arguments (``vars(args)``); the key ones are listed.
        is_lora: whether ``output_dir`` holds LoRA weights rather than a full pipeline.
        metrics: the memorization scorer's report, or None when not scored yet.
        images: validation images (PIL); saved as ``image_{i}.png`` in ``output_dir``.
        dataset: the training data (``--dataset_name`` or ``--train_data_dir``).
        extra_sections: markdown appended after the training section (e.g. the held-out loss
            curve, ``monitor.HeldOutMonitor.card_section``); empty strings are skipped.

    Returns:
        The path of the written README.md.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    hub_base_model = _hub_id_or_none(base_model)
    hub_dataset = _hub_id_or_none(dataset)
    # A local folder is named by its last part only: the card is public, the machine's paths are not.
    base_shown = base_model if hub_base_model else f"path/to/{Path(base_model).name}"
    data_shown = None if dataset is None else dataset if hub_dataset else Path(dataset).name
    card_data = ModelCardData(
        license="creativeml-openrail-m",
        base_model=hub_base_model,
        datasets=[hub_dataset] if hub_dataset else None,
        library_name="diffusers",
    )

    body = [
        f"# {repo_id}",
        "",
        f"{'LoRA adapters for' if is_lora else 'A fine-tune of'} `{base_model if hub_base_model else Path(base_model).name}`"
        + ("" if hub_base_model else " (a local model folder)")
        + (f" on `{data_shown}`" + ("" if hub_dataset else " (a local image folder)") if dataset else "")
        + ", trained with sd-memfree, which mitigates memorization of the training images.",
        "",
        _method_description(method_config),
        memorization_section(metrics, model=base_shown if is_lora else repo_id, lora_weights=repo_id if is_lora else None,
                             train_data_dir=f"path/to/{data_shown}" if data_shown else "<train_data_dir>", dataset_name=hub_dataset),
        _usage(repo_id, base_shown, is_lora),
        _training_section(training_args, is_lora),
        *(section for section in extra_sections if section),
    ]
    if images:
        body += ["## Validation images", ""]
        for i, image in enumerate(images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            replace_file(output_dir / f"image_{i}.png", buffer.getvalue())  # never through a link
            body.append(f"![image_{i}](./image_{i}.png)")
        body.append("")

    card = ModelCard("---\n" + card_data.to_yaml() + "\n---\n\n" + "\n".join(body))
    card = populate_model_card(card, tags=list(_BASE_TAGS) + (["lora"] if is_lora else []))
    path = output_dir / "README.md"
    return replace_file(path, str(card))  # never through a link placed there


# Names of arguments that are secrets: never written to train_args.json, a tracker config, a log
# or a model card.
SECRET_ARGS = ("hub_token",)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# Files of a run's folder that are published (with the pipeline's component folders and the
# images the card shows). memfree_state.json is not among them: it lists the samples AGC skipped
# most, i.e. the training images the model found easiest to memorise.
UPLOADED_FILES = ("README.md", "memfree_config.json", "model_index.json", LORA_WEIGHTS_NAME)
MEMFREE_STATE_NAME = "memfree_state.json"
# Even inside an allowed folder: partial writes never go out.
UPLOAD_IGNORE_PATTERNS = ("*.partial", "*.tmp")


class HubError(ValueError):
    """The Hub refused a request (bad repo id, token or permissions), reported in one line."""


def _pipeline_components(folder: Path) -> list[str]:
    """Component folders named in ``model_index.json`` (``unet``, ``vae``, ...; not the ones set
    to null, like a removed safety checker)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return []
    try:
        entries = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return sorted(k for k, v in entries.items()
                  if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None and (folder / k).is_dir())


def _card_images(folder: Path) -> list[str]:
    """Image files in ``folder`` that ``README.md`` shows (``![...](./name.png)``)."""
    card = folder / "README.md"
    if not card.is_file():
        return []
    names = re.findall(r"!\[[^\]]*\]\(\./([^)/\\\s]+)\)", card.read_text(encoding="utf-8", errors="replace"))
    return sorted({n for n in names if Path(n).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and (folder / n).is_file()})


def upload_allow_patterns(output_dir: str | os.PathLike, include_memfree_state: bool = False) -> list[str]:
    """The allow-list of an upload of ``output_dir`` (patterns for ``upload_folder``).

    The model (the pipeline's component folders named in ``model_index.json``, or the LoRA
    weights file), the model card and the images it shows, ``memfree_config.json``; with
    ``include_memfree_state`` also ``memfree_state.json``. Nothing else: not checkpoints, logs
    (wherever ``--logging_dir`` points), ``train_args.json`` (local paths), crash leftovers
    (``.tmp-*``, ``.old-*``), scorer reports or other files that happen to be in the folder.
    """
    folder = Path(output_dir)
    patterns = [*UPLOADED_FILES, *(f"{c}/*" for c in _pipeline_components(folder)), *_card_images(folder)]
    if include_memfree_state:
        patterns.append(MEMFREE_STATE_NAME)
    return patterns


def files_to_upload(output_dir: str | os.PathLike, allow_patterns: list[str] | None = None,
                    ignore_patterns: list[str] | None = None) -> list[str]:
    """The relative paths ``HfApi.upload_folder`` sends from ``output_dir``, sorted.

    Lists files the way ``upload_folder`` does (every file under the folder, POSIX relative
    paths) and filters them with huggingface_hub's own ``filter_repo_objects`` with the given
    allow patterns (default :func:`upload_allow_patterns`), the ignore patterns (default
    ``UPLOAD_IGNORE_PATTERNS``) and huggingface_hub's default ignore patterns.
    """
    folder = Path(output_dir).expanduser().resolve()
    allow = upload_allow_patterns(folder) if allow_patterns is None else list(allow_patterns)
    ignore = list(UPLOAD_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns) + DEFAULT_IGNORE_PATTERNS
    relpaths = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    return sorted(filter_repo_objects(relpaths, allow_patterns=allow, ignore_patterns=ignore))


def create_repo(repo_id: str, token: str | None = None, api: HfApi | None = None) -> str:
    """Create the model repo if it does not exist (as the diffusers scripts do at start-up, so a
    bad repo id or token fails before training) and return its full id.

    Raises:
        HubError: one line naming the repo and the fix; never the token.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"--hub_model_id {repo_id!r} is not a valid Hub repo id ({str(e).splitlines()[0]}); use 'name' or 'user/name'.") from None
    api = api or HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, exist_ok=True)
    except Exception as e:  # HTTP, auth and offline errors all mean: no upload possible
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if token:
            reason = reason.replace(token, "***")
        raise HubError(f"cannot create or reach the Hub repo {repo_id!r} ({type(e).__name__}: {reason}); "
                       "check --hub_model_id and your login (`hf auth login`), or drop --push_to_hub.") from None
    # create_repo fills in the user namespace when repo_id has none; upload there.
    return getattr(repo_url, "repo_id", None) or repo_id


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    commit_message: str = "End of training",
    api: HfApi | None = None,
    include_memfree_state: bool = False,
) -> str:
    """Create the repo if needed and upload the allow-list of ``output_dir``.

    Args:
        output_dir: the run's output folder (model, README.md, memfree_*.json).
        repo_id: the target model repository.
        token: Hub token; None uses the stored login.
        commit_message: the commit message.
        api: an ``HfApi`` (tests pass a fake); None creates one with ``token``.
        include_memfree_state: also upload ``memfree_state.json`` (the most-skipped sample ids).

    Returns:
        The repo id the Hub returned (with the namespace filled in).
    """
    api = api or HfApi(token=token)
    repo_id = create_repo(repo_id, token=token, api=api)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=commit_message,
        allow_patterns=upload_allow_patterns(output_dir, include_memfree_state),
        ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),
    )
    return repo_id

"""Does the model-only detection score find the copies? ROC AUC on the memorization benchmark.

    python benchmarks/memorization.py --work bench_out/memorization     # writes per-run scores
    python benchmarks/detection_auc.py bench_out/memorization           # this table

For every scored run ``<work>/seed<s>/<method>-<steps>/score/per_image.jsonl`` (one row per
generation, with the scorer's ``noise_magnitude`` and ``pixel_copy``), the ROC AUC of the
detection score (Wen et al., ICLR 2024) for telling the generations that pass the pixel copy
test from the rest. Per model (method and budget): the AUC of each seed's run, and the AUC of
all its seeds' generations pooled. An AUC is undefined (n/a) when a run has no copy or only copies.

Prints a markdown table, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> dict:
    from sd_memfree.scoring.risk import roc_auc

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", help="the memorization benchmark's --work folder")
    args = p.parse_args(argv)
    runs = defaultdict(list)  # (method, steps) -> [(seed, scores, copies)]
    for f in sorted(Path(args.work).glob("seed*/*/score/per_image.jsonl")):
        seed = int(re.sub(r"\D", "", f.parts[-4]))
        method, steps = f.parts[-3].rsplit("-", 1)
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if not rows or rows[0].get("noise_magnitude") is None or "pixel_copy" not in rows[0]:
            continue
        runs[(method, int(steps))].append((seed, np.array([r["noise_magnitude"] for r in rows]), np.array([r["pixel_copy"] for r in rows])))
    table = []
    print("| model | steps | generations | pixel copies | AUC per seed | AUC pooled | score: copies / others (mean) |")
    print("|---|---|---|---|---|---|---|")
    for (method, steps), items in sorted(runs.items(), key=lambda kv: (kv[0][0] != "plain", kv[0][0], kv[0][1])):
        scores = np.concatenate([s for _, s, _ in items])
        copies = np.concatenate([c for _, _, c in items])
        per_seed = {seed: roc_auc(s, c) for seed, s, c in items}
        pooled = roc_auc(scores, copies)
        means = (float(scores[copies].mean()) if copies.any() else None, float(scores[~copies].mean()) if (~copies).any() else None)
        table.append({"method": method, "steps": steps, "generations": int(len(scores)), "copies": int(copies.sum()),
                      "auc_per_seed": per_seed, "auc_pooled": pooled, "mean_score_copies": means[0], "mean_score_others": means[1]})
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {method} | {steps} | {len(scores)} | {int(copies.sum())} | {', '.join(fmt(v) for v in per_seed.values())} | {fmt(pooled)} | "
              f"{fmt(means[0])} / {fmt(means[1])} |")
    result = {"benchmark": "detection_auc", "work": str(args.work), "models": table}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

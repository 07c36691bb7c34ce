"""SSCD, CLIP-score and FID code paths on stand-in weights written to disk and loaded the way the
real files are; weights lookup errors; the training-embedding cache."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sd_memfree.scoring import cache, clip_score, fid, sscd
from sd_memfree.testing import standin
from sd_memfree.testing.tiny import make_tiny_image


@pytest.fixture(scope="module")
def sscd_file(tmp_path_factory):
    return standin.make_standin_sscd(tmp_path_factory.mktemp("sscd") / "standin.torchscript.pt")


@pytest.fixture(scope="module")
def images():
    return [make_tiny_image(i, size=48)[0] for i in range(3)]


def test_sscd_identical_images_score_one_and_unit_norm(sscd_file, images):
    """The stand-in is loaded by file path; a repeated image gets the same descriptor (cos 1.0),
    rows are unit-norm, and the result does not depend on the batch size."""
    model = sscd.load_sscd(str(sscd_file))
    emb = sscd.embed_images(model, images + [images[0].copy()], "dcr", batch_size=3)
    assert emb.shape == (4, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    assert float(emb[0] @ emb[3]) == pytest.approx(1.0, abs=1e-5)
    assert float(emb[0] @ emb[1]) < 1 - 1e-4
    torch.testing.assert_close(sscd.embed_images(model, images + [images[0]], "dcr", batch_size=1), emb, atol=1e-5, rtol=0)


def test_sscd_preprocessing_keeps_aspect_ratio_in_sub_batches(sscd_file, images):
    """`sscd` resizes the short side to 288 without cropping: a 96x48 image becomes 576x288;
    a batch mixing shapes is split by shape and the rows come back in input order."""
    t = sscd.make_transform("sscd")(Image.new("RGB", (96, 48)))
    assert t.shape == (3, 288, 576)
    assert sscd.make_transform("dcr")(Image.new("RGB", (96, 48))).shape == (3, 224, 224)
    wide = images[1].resize((96, 48))
    model = sscd.load_sscd(str(sscd_file))
    mixed = sscd.embed_images(model, [wide, images[0]], "sscd", batch_size=2)
    alone = torch.cat([sscd.embed_images(model, [im], "sscd") for im in (wide, images[0])])
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="--preprocess"):
        sscd.make_transform("imagenet")


def test_known_sscd_name_missing_says_where(tmp_path, monkeypatch, sscd_file):
    """Offline, a known name not in the cache: the error names the URL and the destination; once
    the file is at that destination, the name resolves to it. A path that does not exist gets a
    message about that path, even when its file name is a known model's."""
    monkeypatch.setenv("SD_MEMFREE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SD_MEMFREE_SSCD_BASE_URL", raising=False)
    with pytest.raises(sscd.MissingWeightsError) as e:
        sscd.resolve_sscd_path("sscd_disc_large")
    msg = str(e.value)
    assert "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large.torchscript.pt" in msg
    dest = tmp_path / "sscd" / "sscd_disc_large.torchscript.pt"
    assert str(dest) in msg and "\n" not in msg
    dest.parent.mkdir()
    dest.write_bytes(sscd_file.read_bytes())
    assert sscd.resolve_sscd_path("sscd_disc_large") == dest
    with pytest.raises(sscd.MissingWeightsError, match=f"--sscd_model {tmp_path / 'nope.pt'}: no such file"):
        sscd.resolve_sscd_path(str(tmp_path / "nope.pt"))
    elsewhere = tmp_path / "other" / "sscd_disc_large.torchscript.pt"
    with pytest.raises(sscd.MissingWeightsError) as e:
        sscd.resolve_sscd_path(str(elsewhere))
    assert str(elsewhere) in str(e.value) and "no such file" in str(e.value) and str(dest) not in str(e.value)


def test_embedding_cache_computes_once(tmp_path):
    """Second lookup of the same key loads from disk: compute() runs once; any key part changes the key."""
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6.0).reshape(3, 2)

    c = cache.EmbeddingCache(tmp_path)
    key = cache.cache_key("abc", "dcr", "fp1", "image", 3)
    first, hit1 = c.get_or_compute(key, compute)
    second, hit2 = c.get_or_compute(key, compute)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert torch.equal(first, second)
    others = {cache.cache_key("abd", "dcr", "fp1", "image", 3), cache.cache_key("abc", "sscd", "fp1", "image", 3),
              cache.cache_key("abc", "dcr", "fp2", "image", 3), cache.cache_key("abc", "dcr", "fp1", "image", 4)}
    assert key not in others and len(others) == 4


def test_clip_score_loads_local_weights_file(tmp_path, images):
    """A tiny open_clip architecture with random weights saved to a file: the scorer loads that
    file (its parameters equal the saved ones) and the score is the cosine of the normalised
    image and text features, recomputed here by hand."""
    name, weights = standin.make_tiny_clip(tmp_path)
    scorer = clip_score.ClipScorer(name, str(weights))
    saved = torch.load(weights, weights_only=True)
    for k, v in scorer.model.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    prompts = ["a red circle", "a blue square", "stripes"]
    got = clip_score.clip_scores(scorer, images, prompts, batch_size=2)
    with torch.no_grad():
        img = scorer.model.encode_image(torch.stack([scorer.preprocess(im) for im in images]))
        txt = scorer.model.encode_text(scorer.tokenizer(prompts))
    want = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_clip_weights_missing_is_one_clear_line(monkeypatch):
    """An open_clip tag that is not cached stops with one line naming the fix; nothing is fetched."""
    monkeypatch.setattr(clip_score, "_cached_tag_file", lambda cfg: None)
    with pytest.raises(sscd.MissingWeightsError) as e:
        clip_score.resolve_clip_weights("ViT-B-16", "openai")
    assert "not cached" in str(e.value) and "--clip_pretrained" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(sscd.MissingWeightsError, match="neither a file nor an open_clip tag"):
        clip_score.resolve_clip_weights("ViT-B-16", "no-such-tag")


def test_frechet_distance_hand_computed():
    """S1 = diag(1, 4), S2 = diag(4, 1), mu1 - mu2 = (1, 0):
    |dmu|^2 = 1; tr S1 + tr S2 = 10; sqrt(S1 S2) = diag(2, 2) -> trace 4; FID = 1 + 10 - 8 = 3."""
    got = fid.frechet_distance(torch.tensor([1.0, 0]), torch.diag(torch.tensor([1.0, 4])), torch.zeros(2), torch.diag(torch.tensor([4.0, 1])))
    assert got == pytest.approx(3.0)


def test_frechet_distance_equals_torchmetrics_formula():
    """The symmetric form equals torchmetrics' eigvals(S1 @ S2) form on random covariances."""
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(30, 6, generator=g, dtype=torch.float64) * 2 + 1
    args = (a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    assert fid.frechet_distance(*args) == pytest.approx(float(_compute_fid(*args)), rel=1e-8)


@pytest.mark.slow  # Inception-v3 at 299 px on CPU: ~15-35 s on 2 cores
def test_fid_on_random_inception_weights_file(tmp_path, images):
    """torchmetrics' FID loads torch-fidelity's Inception from a local file: identical sets give ~0
    (round-off of rank-2 covariances in 2048-d aside), different sets a clearly positive distance."""
    weights = standin.make_random_inception_weights(tmp_path / "inception.pth")
    meter = fid.FidMeter(str(weights))
    meter.update(images[:2], real=True)
    meter.update(images[:2], real=False)
    identical = meter.compute()
    meter.update([make_tiny_image(i, size=48, seed=7)[0] for i in range(2)], real=False)  # 2 copies + 2 others
    different = meter.compute()
    assert different > 1.0
    assert abs(identical) < 1e-3 * different


def test_fid_weights_missing_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(sscd.MissingWeightsError) as e:
        fid.resolve_inception_weights(None)
    assert fid.INCEPTION_URL in str(e.value) and str(tmp_path / "hub" / "checkpoints" / fid.INCEPTION_FILE) in str(e.value)

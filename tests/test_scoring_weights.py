"""Weights that fetch and verify themselves, tested without the internet: a local HTTP server on
127.0.0.1 serves a stand-in SSCD TorchScript file through ``$SD_MEMFREE_SSCD_BASE_URL``.
Also: SSCD files that are not TorchScript or return unusable descriptors are refused with one
line naming the file."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest
import torch

from sd_memfree.scoring import sscd
from sd_memfree.testing import standin


class _Server(http.server.ThreadingHTTPServer):
    files: dict  # file name -> (bytes, mode); mode "ok" or "truncate" (promise all, send half, close)
    hits: list


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        name = self.path.rsplit("/", 1)[-1]
        self.server.hits.append(self.path)
        if name not in self.server.files:
            self.send_error(404)
            return
        body, mode = self.server.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "truncate" else body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch, tmp_path):
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files, srv.hits = {}, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("SD_MEMFREE_SSCD_BASE_URL", f"http://127.0.0.1:{srv.server_address[1]}/mirror/")
    monkeypatch.setenv("SD_MEMFREE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("no_proxy", "NO_PROXY"):  # never send 127.0.0.1 through a proxy of the machine
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def standin_bytes(tmp_path_factory):
    """A stand-in that detects copies (a known name must, before it is cached)."""
    return standin.make_copy_detector_sscd(tmp_path_factory.mktemp("standin") / "s.pt").read_bytes()


@pytest.fixture(scope="module")
def random_standin_bytes(tmp_path_factory):
    """A well-formed SSCD-shaped TorchScript with random weights: it does not detect copies."""
    return standin.make_standin_sscd(tmp_path_factory.mktemp("random-standin") / "s.pt").read_bytes()


def _cache_files(tmp_path):
    folder = tmp_path / "cache" / "sscd"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_known_name_downloads_verifies_and_is_reused(server, standin_bytes, tmp_path):
    """First use fetches <base>/sscd_disc_mixup.torchscript.pt into the cache (same bytes, same
    SHA-256) and the model embeds; the second use reads the cache: the server sees one request."""
    server.files["sscd_disc_mixup.torchscript.pt"] = (standin_bytes, "ok")
    model = sscd.load_sscd("sscd_disc_mixup")
    dest = tmp_path / "cache" / "sscd" / "sscd_disc_mixup.torchscript.pt"
    assert dest.read_bytes() == standin_bytes and _cache_files(tmp_path) == [dest.name, sscd.VERIFIED_FILE]
    assert server.hits == ["/mirror/sscd_disc_mixup.torchscript.pt"]
    assert sscd.file_sha256(dest) == hashlib.sha256(standin_bytes).hexdigest()
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    sscd.load_sscd("sscd_disc_mixup")
    assert sscd.resolve_sscd_path("sscd_disc_mixup") == dest and len(server.hits) == 1


def test_interrupted_download_leaves_nothing(server, standin_bytes, tmp_path):
    """The server promises the whole file (Content-Length) but closes after half: one line that
    says what to download and where, and no file (not even a temporary one) in the cache."""
    server.files["sscd_disc_mixup.torchscript.pt"] = (standin_bytes, "truncate")
    with pytest.raises(sscd.MissingWeightsError) as e:
        sscd.load_sscd("sscd_disc_mixup")
    msg = str(e.value)
    assert "could not download" in msg and "interrupted" in msg and "\n" not in msg
    assert str(tmp_path / "cache" / "sscd" / "sscd_disc_mixup.torchscript.pt") in msg
    assert _cache_files(tmp_path) == []


def test_corrupt_or_wrong_download_is_refused(server, standin_bytes, tmp_path):
    """Bytes that are not TorchScript, and a working model of the wrong width (the 512-d stand-in
    served as the 1024-d sscd_disc_large), are refused and never enter the cache."""
    server.files["sscd_disc_mixup.torchscript.pt"] = (b"<html>proxy login page</html>" * 50, "ok")
    with pytest.raises(sscd.SSCDError, match="is not a TorchScript model"):
        sscd.load_sscd("sscd_disc_mixup")
    server.files["sscd_disc_large.torchscript.pt"] = (standin_bytes, "ok")
    with pytest.raises(sscd.SSCDError, match="512-d descriptors; this SSCD model has 1024-d"):
        sscd.load_sscd("sscd_disc_large")
    assert _cache_files(tmp_path) == []


def test_offline_or_unreachable_says_what_to_download(server, monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1: no request at all; an unreachable server (404 here, a closed port
    below): one line with the URL and the destination."""
    dest = tmp_path / "cache" / "sscd" / "sscd_disc_blur.torchscript.pt"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sscd.MissingWeightsError) as e:
        sscd.load_sscd("sscd_disc_blur")
    assert "HF_HUB_OFFLINE" in str(e.value) and str(dest) in str(e.value) and server.hits == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(sscd.MissingWeightsError, match="could not download") as e:
        sscd.load_sscd("sscd_disc_blur")  # not served: 404
    assert f"{sscd.sscd_base_url()}/sscd_disc_blur.torchscript.pt" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("SD_MEMFREE_SSCD_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(sscd.MissingWeightsError, match="could not download"):
        sscd.load_sscd("sscd_disc_blur")
    assert _cache_files(tmp_path) == []


class _Returns(torch.nn.Module):
    """A TorchScript-able model whose output is broken in one chosen way."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = x.mean(dim=(2, 3)).repeat(1, 4)  # [B, 12], non-zero for the probe
        if self.kind == "nan":
            return emb * float("nan")
        if self.kind == "inf":
            return emb / 0.0
        if self.kind == "zero":
            return emb * 0.0
        if self.kind == "flat":
            return emb.flatten()
        return emb


@pytest.mark.parametrize("kind,message", [
    ("nan", "NaN or inf descriptors for 2 of 2"), ("inf", "NaN or inf descriptors"),
    ("zero", "all-zero descriptors for 2 of 2"), ("flat", r"returned \(24,\) for a batch of 2"),
])
def test_sscd_file_with_unusable_output_is_refused(tmp_path, kind, message):
    path = tmp_path / f"{kind}.pt"
    torch.jit.script(_Returns(kind)).save(str(path))
    with pytest.raises(sscd.SSCDError, match=message) as e:
        sscd.load_sscd(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_sscd_file_that_is_a_pickle_is_refused_without_unpickling(tmp_path):
    """A torch.save'd state dict (a pickle) is not TorchScript: refused, naming the file."""
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(sscd.SSCDError, match="is not a TorchScript model") as e:
        sscd.load_sscd(str(path))
    assert str(path) in str(e.value)


def test_embedding_batches_are_checked_too():
    """A model that passes the probe but returns NaN on real data still stops the run (a NaN
    similarity would read as 'no memorization')."""
    from sd_memfree.testing.tiny import make_tiny_image

    with pytest.raises(sscd.SSCDError, match="my.pt returned NaN or inf"):
        sscd.embed_images(_Returns("nan"), [make_tiny_image(0, 32)[0]], "dcr", source="SSCD file my.pt")


def test_clip_and_inception_are_fetched_by_their_own_libraries(tmp_path, monkeypatch):
    """Online and not cached: CLIP comes from open_clip's download_pretrained and the Inception
    file from torch-fidelity's own loader (no download code of ours); their failures become one
    line that says what to fetch. Offline, neither library is called."""
    import open_clip
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    from sd_memfree.scoring import clip_score, fid

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(clip_score, "_cached_tag_file", lambda cfg: None)
    weights = tmp_path / "clip.bin"
    weights.write_bytes(b"x")
    asked = []
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg, **k: asked.append(cfg) or str(weights))
    path, overrides = clip_score.resolve_clip_weights("ViT-B-16", "openai")
    assert path == str(weights) and len(asked) == 1 and overrides["force_quick_gelu"] is True

    def no_network(*a, **k):
        raise OSError("Temporary failure in name resolution\nmore")

    monkeypatch.setattr(open_clip, "download_pretrained", no_network)
    with pytest.raises(sscd.MissingWeightsError, match="could not fetch CLIP weights ViT-B-16/openai") as e:
        clip_score.resolve_clip_weights("ViT-B-16", "openai")
    assert "name resolution" in str(e.value) and "\n" not in str(e.value)

    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    class FakeExtractor:
        def __init__(self, *a, **k):  # what torch-fidelity does: download into torch hub's cache
            (hub / "checkpoints").mkdir(parents=True)
            (hub / "checkpoints" / fid.INCEPTION_FILE).write_bytes(b"w")

    monkeypatch.setattr(fidelity, "FeatureExtractorInceptionV3", FakeExtractor)
    assert fid.resolve_inception_weights(None) == hub / "checkpoints" / fid.INCEPTION_FILE
    (hub / "checkpoints" / fid.INCEPTION_FILE).unlink()
    (hub / "checkpoints").rmdir()
    monkeypatch.setattr(fidelity, "FeatureExtractorInceptionV3", no_network)
    with pytest.raises(sscd.MissingWeightsError, match="could not fetch the FID Inception weights") as e:
        fid.resolve_inception_weights(None)
    assert fid.INCEPTION_URL in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: pytest.fail("downloaded while offline"))
    monkeypatch.setattr(fidelity, "FeatureExtractorInceptionV3", lambda *a, **k: pytest.fail("downloaded while offline"))
    with pytest.raises(sscd.MissingWeightsError, match="HF_HUB_OFFLINE"):
        clip_score.resolve_clip_weights("ViT-B-16", "openai")
    with pytest.raises(sscd.MissingWeightsError, match="HF_HUB_OFFLINE"):
        fid.resolve_inception_weights(None)
    with pytest.raises(sscd.MissingWeightsError, match=f"--fid_weights {tmp_path / 'none.pth'}: no such file"):
        fid.resolve_inception_weights(str(tmp_path / "none.pth"))

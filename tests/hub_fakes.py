"""A stand-in for ``huggingface_hub.HfApi`` that never touches the network.

``upload_folder`` records its keyword arguments and computes the exact list of files the real
``HfApi.upload_folder`` would send with them, with huggingface_hub's own code: its folder walk and
``filter_repo_objects`` (``HfApi._prepare_upload_folder_additions``), after adding the default
ignore patterns as ``upload_folder`` does. Only the README metadata check (a network call) is
stubbed.
"""

from __future__ import annotations

from types import SimpleNamespace

from huggingface_hub import HfApi
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS


def files_sent(upload_kwargs: dict) -> list[str]:
    """What ``HfApi.upload_folder(**upload_kwargs)`` would upload, sorted."""
    real = HfApi()
    real._validate_yaml = lambda **kwargs: None
    ignore = upload_kwargs.get("ignore_patterns") or []
    ignore = ([ignore] if isinstance(ignore, str) else list(ignore)) + DEFAULT_IGNORE_PATTERNS
    ops = real._prepare_upload_folder_additions(upload_kwargs["folder_path"], upload_kwargs.get("path_in_repo") or "",
                                                allow_patterns=upload_kwargs.get("allow_patterns"), ignore_patterns=ignore)
    return sorted(op.path_in_repo for op in ops)


class RecordingApi:
    """Records every call; ``create_repo`` fills in a namespace like the Hub does for a bare name,
    or raises ``fail`` when given; ``uploads`` holds the file list of each ``upload_folder``."""

    def __init__(self, token=None, fail: Exception | None = None):
        self.tokens = [token]
        self.calls: list = []
        self.uploads: list[list[str]] = []
        self.fail = fail

    def __call__(self, token=None):  # used as a factory in place of the HfApi class
        self.tokens.append(token)
        return self

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail is not None:
            raise self.fail
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        self.uploads.append(files_sent(kwargs))

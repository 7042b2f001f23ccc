"""Provenance of a result folder: library versions, git commit, device, machine and date."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_PACKAGES = ("softguard", "torch", "transformers", "accelerate", "numpy", "numba")
_REPO_ROOT = Path(__file__).resolve().parents[1]


def library_versions() -> dict[str, str | None]:
    """Return the installed version of each library that can change results (None if absent)."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def git_revision(root: Path = _REPO_ROOT) -> dict[str, Any]:
    """Return the commit hash of the source tree and whether it has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        logger.debug("No git revision for %s: %s", root, error)
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(status.strip())}


def machine_info() -> dict[str, Any]:
    """Return the host's CPU count, platform and the torch thread count."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }


def device_info(device: str) -> dict[str, Any]:
    """Describe the device that runs the model (the GPU name when it is a CUDA device)."""
    import torch

    info: dict[str, Any] = {"device": device}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["name"] = torch.cuda.get_device_name(torch.device(device))
    return info


def collect(device: str) -> dict[str, Any]:
    """Return the provenance block written beside every result."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "git": git_revision(),
        "device": device_info(device),
        "machine": machine_info(),
    }

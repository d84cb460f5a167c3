"""What a result file records about the code and the machine that made it.

:func:`run_metadata` is the one place for it (``attnkit compare`` and ``attnkit bench`` call
it); :func:`code_hash` keys ``attnkit compare``'s cache, so that a change to the library's
source never silently reuses results made by the old code.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from pathlib import Path

__all__ = ["run_metadata", "code_hash", "git_commit", "cpu_model", "device_name"]

_PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """sha256 (first 16 hex digits) of every ``.py`` file of the installed attnkit package,
    path and content. Works for an installed wheel too, where there is no git commit, and sees
    uncommitted edits, which a commit does not."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(_PACKAGE)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _git() -> tuple[str | None, bool | None]:
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=_PACKAGE, capture_output=True, text=True,
                             timeout=10)
        if top.returncode != 0:
            return None, None
        # only a checkout that holds this package counts (not a git repository the venv happens to sit in)
        root = Path(top.stdout.strip()).resolve()
        if not (root / "src" / "attnkit").resolve() == _PACKAGE:
            return None, None
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src"], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None, None
    if commit.returncode != 0:
        return None, None
    return commit.stdout.strip(), (bool(status.stdout.strip()) if status.returncode == 0 else None)


def git_commit() -> str | None:
    """HEAD of the git checkout attnkit is imported from; None for an installed copy."""
    return _git()[0]


@functools.lru_cache(maxsize=1)
def cpu_model() -> str | None:
    """The CPU's "model name" from /proc/cpuinfo (Linux); ``platform.processor()`` elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def device_name(device) -> str:
    """``NVIDIA H200`` for a CUDA device, the CPU model for the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model() or platform.machine()


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def run_metadata(device) -> dict:
    """Provenance of a result, JSON-ready::

        {"git": {"commit": "9960232…" | None, "dirty": bool | None},   # dirty: uncommitted edits under src/
         "code_hash": "3f2a…",                                          # see code_hash()
         "versions": {"attnkit", "torch", "triton" (None if absent), "python", "cuda" (None on CPU builds)},
         "device": {"type": "cuda" | "cpu", "name": "NVIDIA H200" | CPU model},
         "cpu": {"model": str | None, "threads": torch.get_num_threads()},
         "platform": "Linux-6.8…-x86_64-with-glibc2.39"}

    ``device``: a ``torch.device`` or a string such as ``"cuda"`` or ``"cpu"``.
    """
    import torch

    from . import __version__

    device = torch.device(device)
    commit, dirty = _git()
    return {
        "git": {"commit": commit, "dirty": dirty},
        "code_hash": code_hash(),
        "versions": {"attnkit": __version__, "torch": torch.__version__, "triton": _version_of("triton"),
                     "python": platform.python_version(), "cuda": torch.version.cuda},
        "device": {"type": device.type, "name": device_name(device)},
        "cpu": {"model": cpu_model(), "threads": torch.get_num_threads()},
        "platform": platform.platform(),
    }

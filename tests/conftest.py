import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU through triton's interpreter (read when a kernel is defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run on the GPU machine (see README, 'GPU checks')")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float((ref - out).norm() / ref.norm().clamp_min(1e-30))


def load_script(name: str):
    """``benchmarks/<name>.py`` loaded as a module from its file (the scripts are not a package, and
    putting benchmarks/ on sys.path would let benchmarks/kvpress shadow the kvpress package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

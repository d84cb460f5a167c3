import pytest

pytest.importorskip("transformers")

from hf_models import tiny  # noqa: E402


@pytest.fixture
def llama():
    """A tiny random Llama (2 layers, 4 query heads, 2 KV heads, head dim 16), fp32, eval mode."""
    return tiny("llama")

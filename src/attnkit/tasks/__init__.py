"""Tasks for ``attnkit compare``: MQAR, byte-level text LM on a real corpus, passkey retrieval."""

from .base import Task
from .mqar import MQAR
from .passkey import Passkey
from .text import TextCorpus, load_corpus, stdlib_path

__all__ = ["Task", "MQAR", "Passkey", "TextCorpus", "load_corpus", "stdlib_path"]

# issue 28: procedural image classification for the vision modules (attnkit.vision)
from .images import FrozenPatchEncoder, ImageTask  # noqa: E402

__all__ += ["ImageTask", "FrozenPatchEncoder"]
# issue 28: the synthetic sequential-recommendation world (attnkit.models.recsys trains on it)
from .recsys import RecsysWorld  # noqa: E402

__all__ += ["RecsysWorld"]

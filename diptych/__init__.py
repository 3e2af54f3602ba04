"""diptych: one post-training algorithm, two panels (JAX and PyTorch), proven to agree."""

from diptych.core.backend import Backend, available_backends, get_backend
from diptych.core.spec import DecoderSpec

__all__ = ["Backend", "DecoderSpec", "available_backends", "get_backend"]
__version__ = "0.1.0"

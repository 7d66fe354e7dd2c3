"""adapt: turn pretrained autoregressive causal LMs into masked diffusion language models."""

from adapt.errors import AdaptError

__version__ = "0.1.0"

__all__ = ["AdaptError", "__version__"]

"""adapt: turn pretrained autoregressive causal LMs into masked diffusion language models."""

from adapt.core.errors import AdaptError
from adapt.core.notices import quiet
from adapt.core.version import __version__

quiet()  # logging filters for two library notices (adapt/core/notices.py)

__all__ = ["AdaptError", "SamplingConfig", "__version__", "generate"]


def __getattr__(name: str) -> object:
    # Lazy: `import adapt` stays light; torch loads on first use of the sampler.
    if name in ("generate", "SamplingConfig"):
        import adapt.sampling

        return getattr(adapt.sampling, name)
    raise AttributeError(f"module 'adapt' has no attribute {name!r}")

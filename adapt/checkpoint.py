"""The import path model cards used before the package was split into layers (adapt <= 2026-12-02):
`from adapt.checkpoint import load_diffusion_model` keeps working for cards already on the Hub."""

from adapt.loading.model import load_diffusion_model

__all__ = ["load_diffusion_model"]

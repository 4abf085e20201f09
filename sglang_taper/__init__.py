"""sglang-taper: everything that touches SGLang (plugin, launcher, frontend)."""

__version__ = "0.1.0"

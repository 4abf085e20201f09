"""sglang-taper: everything that touches SGLang (plugin, launcher, frontend)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily: the frontend pulls in sglang.lang, which the CLI does not need.
    if name == "TaperEndpoint":
        from sglang_taper.adapter.frontend import TaperEndpoint

        return TaperEndpoint
    raise AttributeError(name)

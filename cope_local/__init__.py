"""cope-local: an offline personal writing assistant.

Public API (light to import: no torch, no llama.cpp until used):

    from cope_local import Decoder, GenConfig, resolve_model, CopeError

Training, conversion and evaluation load torch lazily in their own modules.
"""

from __future__ import annotations

__version__ = "0.1.0"

from cope_local.errors import CopeError

__all__ = ["CopeError", "Decoder", "GenConfig", "Generation", "__version__", "resolve_model"]


def __getattr__(name: str):
    # Lazy: `import cope_local` must stay cheap (the CLI imports it for --help).
    if name in ("Decoder", "GenConfig", "Generation"):
        from cope_local import decode

        return getattr(decode, name)
    if name == "resolve_model":
        from cope_local.models import resolve_model

        return resolve_model
    raise AttributeError(name)

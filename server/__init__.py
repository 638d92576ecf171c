"""The sdm-lm selective-generation server: ``create_app(ServerConfig(...))`` or ``python -m server --bundle PATH``.

Imports nothing from ``training``; the bundle (``sdm_core.lm.bundle``) carries everything serving needs. Names are
imported lazily, so ``python -m server --help`` and configuration errors answer without loading torch.
"""

from __future__ import annotations

__all__ = ["create_app", "ServerConfig", "ConfigError"]


def __getattr__(name: str):
    if name == "create_app":
        from server.app import create_app

        return create_app
    if name in ("ServerConfig", "ConfigError"):
        from server import config

        return getattr(config, name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")

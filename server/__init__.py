"""The sdm-lm selective-generation server: ``create_app(ServerConfig(...))`` or ``python -m server --bundle PATH``.

Imports nothing from ``training``; the bundle (``sdm_core.bundle``) carries everything serving needs.
"""

from server.app import create_app
from server.config import ConfigError, ServerConfig

__all__ = ["create_app", "ServerConfig", "ConfigError"]

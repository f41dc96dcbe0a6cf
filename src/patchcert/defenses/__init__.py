"""Defenses: aggregators over score maps ``[N, K, H, W]`` with ``predict`` and ``certify``."""

from .base import Defense, create_defense, list_defenses, register_defense
from . import voting  # noqa: F401

__all__ = ["Defense", "create_defense", "list_defenses", "register_defense"]

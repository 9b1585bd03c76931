"""Tiny open_clip configs for tests and the CPU demo, registered next to open_clip's own models."""
from pathlib import Path

import open_clip

_registered = False


def register() -> None:
    """Make `ViT-Tiny-16` and `ViT-Tiny-32` known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(Path(__file__).parent)
        _registered = True


def known_models() -> list[str]:
    register()
    return open_clip.list_models()

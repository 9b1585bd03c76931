"""unicom-ds: the Unicom pre-training pipeline (clustering, sharded-prototype training, evaluation)."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load", "ShardedPrototypes", "__version__"]


def __getattr__(name: str):
    # Lazy: `import unicom_ds` stays cheap for the launcher and config tools.
    if name == "load":
        from unicom_ds.loading import load
        return load
    if name == "ShardedPrototypes":
        from unicom_ds.prototypes import ShardedPrototypes
        return ShardedPrototypes
    raise AttributeError(f"module 'unicom_ds' has no attribute {name!r}")

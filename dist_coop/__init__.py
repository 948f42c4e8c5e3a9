"""dist_coop: cost-adaptive (depth-adaptive) networks trained cooperatively, distributed."""

from typing import Any

__all__ = ["adaptive_from"]


def __getattr__(name: str) -> Any:
    """``dist_coop.adaptive_from`` without importing torch on ``import dist_coop`` (the CLI starts fast)."""
    if name == "adaptive_from":
        from dist_coop.models.convert import adaptive_from

        return adaptive_from
    raise AttributeError(f"module 'dist_coop' has no attribute {name!r}")

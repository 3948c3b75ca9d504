"""Hooks that put nvfp4_dist into other frameworks' training loops (Megatron-core: NVFP4Hook)."""

from .megatron import NVFP4Hook

__all__ = ["NVFP4Hook"]

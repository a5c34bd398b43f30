"""The meta-architecture ``QueryInst`` (META_ARCH_REGISTRY) and its post-processing."""
from .queryinst import QueryInst, queryinst_postprocess

__all__ = [k for k in globals() if not k.startswith("_")]  # as Detectron2's modeling/

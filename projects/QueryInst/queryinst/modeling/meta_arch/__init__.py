"""The meta-architecture ``QueryInst`` (META_ARCH_REGISTRY) and its post-processing."""
from .queryinst import QueryInst, queryinst_postprocess

__all__ = ["QueryInst", "queryinst_postprocess"]

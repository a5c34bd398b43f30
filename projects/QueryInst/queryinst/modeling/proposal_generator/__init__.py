"""Learnable proposal boxes and features (PROPOSAL_GENERATOR_REGISTRY)."""
from .learnable_proposals import LearnableProposals

__all__ = [k for k in globals() if not k.startswith("_")]  # as Detectron2's modeling/

"""Learnable proposal boxes and features (PROPOSAL_GENERATOR_REGISTRY)."""
from .learnable_proposals import LearnableProposals

__all__ = ["LearnableProposals"]

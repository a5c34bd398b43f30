"""The track head of QueryInst-VIS and its matching loss (docs/method.md §6.1).

The paper (§4, YouTube-VIS) represents categories, boxes, masks and instance association
embeddings by the same object queries; the association embedding is an MLP of the last
stage's query. It is trained as MaskTrack R-CNN's (Yang et al., ICCV 2019) track head: each
key-frame query that the Hungarian matcher assigns to a GT instance is scored against the
reference frame's matched queries plus a "new object" slot, with cross-entropy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TrackHead", "track_match_targets", "track_match_loss"]

IGNORE = -1  # target of a key-frame query that no GT instance took: no loss


class TrackHead(nn.Module):
    """MLP from an object query to its association embedding.

    ``num_fcs`` Linear layers of width ``embed_dim``, ReLU between them (none after the
    last), as MaskTrack R-CNN's track head after its RoI features.
    """

    def __init__(self, in_dim: int, embed_dim: int = 256, num_fcs: int = 2):
        """
        Args:
            in_dim: D, the query width (``MODEL.QUERYINST.HIDDEN_DIM``).
            embed_dim: E, hidden and output width (``MODEL.QUERYINST_VIS.TRACK_HEAD.EMBED_DIM``).
            num_fcs: number of Linear layers, >= 1 (``...TRACK_HEAD.NUM_FCS``).

        Raises:
            ValueError: if num_fcs < 1.
        """
        super().__init__()
        if num_fcs < 1:
            raise ValueError(f"MODEL.QUERYINST_VIS.TRACK_HEAD.NUM_FCS must be >= 1, got {num_fcs}")
        layers = []
        for i in range(num_fcs):
            layers.append(nn.Linear(in_dim if i == 0 else embed_dim, embed_dim))
            if i < num_fcs - 1:
                layers.append(nn.ReLU(inplace=True))
        self.mlp = nn.Sequential(*layers)

    def forward(self, queries: Tensor) -> Tensor:
        """
        Args:
            queries: float (..., D) object queries.

        Returns:
            Tensor: float (..., E) association embeddings.
        """
        return self.mlp(queries)


def track_match_targets(
    num_queries: int,
    key_indices: tuple[Tensor, Tensor],
    key_ids: Tensor,
    ref_indices: tuple[Tensor, Tensor],
    ref_ids: Tensor,
) -> Tensor:
    """Cross-entropy targets of one key frame's queries (docs/method.md §6.1).

    Args:
        num_queries: N, queries of the key frame.
        key_indices: the matcher's (query indices, GT indices) of the key frame, int64 (M_k,).
        key_ids: int64 (G_k,), identity (``gt_ids``) of each key-frame GT instance.
        ref_indices: the same for the reference frame, int64 (M_r,) each.
        ref_ids: int64 (G_r,), identities of the reference-frame GT instances.

    Returns:
        Tensor: int64 (N,). For query q: ``IGNORE`` (-1) if no GT instance was matched to it;
        0 ("new object") if its instance has no matched query in the reference frame;
        1 + j if its instance is matched to the reference frame's j-th matched query
        (j indexes ``ref_indices[0]`` in the given order).
    """
    targets = torch.full((num_queries,), IGNORE, dtype=torch.int64, device=key_ids.device)
    key_q, key_g = key_indices
    ref_identity = ref_ids[ref_indices[1]]  # (M_r,) identity behind each reference slot
    same = key_ids[key_g][:, None] == ref_identity[None, :]  # (M_k, M_r), <= 1 True per row
    if same.shape[1]:
        targets[key_q] = torch.where(same.any(1), same.float().argmax(1) + 1, 0)
    else:  # no matched query in the reference frame: every instance is new there
        targets[key_q] = 0
    return targets


def track_match_loss(
    key_embeds: Tensor, ref_embeds: Tensor, targets: Tensor
) -> tuple[Tensor, int]:
    """MaskTrack R-CNN's matching cross-entropy for one key/reference pair (docs/method.md §6.1).

    Args:
        key_embeds: float (N, E), embeddings of the key frame's queries.
        ref_embeds: float (M_r, E), embeddings of the reference frame's matched queries, in
            the order ``track_match_targets`` indexes them.
        targets: int64 (N,) from ``track_match_targets``.

    Returns:
        tuple[Tensor, int]: the sum of the cross-entropies over the supervised queries
        (targets != -1), and their number. Logits of a query are ``[0, key . ref_1, ..., key . ref_M]``: the "new object" slot
        has a fixed logit 0, as in MaskTrack R-CNN.
    """
    keep = targets != IGNORE
    dots = key_embeds[keep] @ ref_embeds.t()  # (S, M_r)
    logits = torch.cat([dots.new_zeros((len(dots), 1)), dots], dim=1)
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())

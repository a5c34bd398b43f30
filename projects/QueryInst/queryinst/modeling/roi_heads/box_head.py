"""One box stage of QueryInst: the "DIIHead" (dynamic instance interaction head).

docs/method.md §1.3, steps 2-7; paper section 3 (query-based box stage, as in
Sparse R-CNN). RoIAlign (step 1) and box decoding (step 8) are done by the caller.
"""
from __future__ import annotations

import math

from torch import Tensor, nn

from .dynamic_conv import DynamicConv

__all__ = ["DIIHead"]


def _fc_stack(dim: int, num_layers: int) -> nn.Sequential:
    """``num_layers`` x [Linear(dim, dim, no bias), LayerNorm(dim), ReLU] (docs/method.md §1.3,
    steps 6-7)."""
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        # No bias: the LayerNorm that follows would cancel it.
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class DIIHead(nn.Module):
    """Updates the N queries of each image from their RoI features and predicts class and box.

    Self-attention among the queries of one image, dynamic instance interaction with the
    query's own RoI feature, an FFN, then a classification and a regression branch.

    docs/method.md §1.3, steps 2-7; init from docs/method.md §2.3.

    Args:
        num_classes: C, foreground classes (sigmoid classification, no background logit).
        hidden_dim: D, query and RoI feature channels.
        dim_feedforward: F, hidden width of the FFN.
        num_heads: self-attention heads.
        dropout: dropout probability of attention weights, interaction output and FFN.
        dynamic_dim: inner width of :class:`DynamicConv`.
        pooler_resolution: S, side of the RoI features.
        num_cls_fcs: hidden layers of the classification branch.
        num_reg_fcs: hidden layers of the regression branch.
        prior_prob: initial foreground probability encoded in the classification bias.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        hidden_dim: int = 256,
        dim_feedforward: int = 2048,
        num_heads: int = 8,
        dropout: float = 0.0,
        dynamic_dim: int = 64,
        pooler_resolution: int = 7,
        num_cls_fcs: int = 1,
        num_reg_fcs: int = 3,
        prior_prob: float = 0.01,
    ):
        super().__init__()
        self.prior_prob = prior_prob

        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(hidden_dim)

        self.instance_interaction = DynamicConv(
            hidden_dim, dynamic_dim, pooler_resolution, with_proj=True
        )
        self.instance_interaction_dropout = nn.Dropout(dropout)
        self.instance_interaction_norm = nn.LayerNorm(hidden_dim)

        self.ffn = nn.Sequential(
            nn.Linear(hidden_dim, dim_feedforward),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dim_feedforward, hidden_dim),
            nn.Dropout(dropout),
        )
        self.ffn_norm = nn.LayerNorm(hidden_dim)

        self.cls_fcs = _fc_stack(hidden_dim, num_cls_fcs)
        self.reg_fcs = _fc_stack(hidden_dim, num_reg_fcs)
        self.cls_score = nn.Linear(hidden_dim, num_classes)
        self.bbox_pred = nn.Linear(hidden_dim, 4)

        self._init_weights()

    def _init_weights(self) -> None:
        """docs/method.md §2.3: xavier_uniform_ on every parameter with dim > 1, focal prior bias.

        Biases other than ``cls_score`` keep PyTorch's defaults, as in the official code:
        zeros for the attention in/out projections, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
        the other Linear layers. LayerNorms keep weight 1, bias 0.
        """
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # Every class starts at probability prior_prob so the focal loss is not swamped by
        # the many background queries early in training.
        nn.init.constant_(self.cls_score.bias, -math.log((1 - self.prior_prob) / self.prior_prob))

    def forward(
        self, roi_features: Tensor, query: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Runs one box stage.

        Args:
            roi_features: (B*N, D, S, S) float tensor, RoIAlign of this stage's input boxes;
                row b*N + n belongs to query n of image b.
            query: (B, N, D) float tensor, the previous stage's ``object_feats`` (or the
                learnable proposal features for stage 1).

        Returns:
            cls_logits: (B, N, C) classification logits (apply sigmoid; no background).
            bbox_deltas: (B, N, 4) box deltas (dx, dy, dw, dh) relative to the input boxes,
                in Detectron2 ``Box2BoxTransform`` units; with weights (2, 2, 1, 1) they
                match the official stds [0.5, 0.5, 1, 1] (docs/method.md §1.3, step 8).
            object_feats: (B, N, D) updated queries, input of the next stage (not detached).
            attn_feats: (B, N, D) post-self-attention queries (paper's q*_{t-1}), which
                generate the dynamic parameters of this stage's mask head.
            All outputs share the input dtype.

        Raises:
            ValueError: if ``roi_features`` does not have B*N rows of shape (D, S, S).
        """
        batch, num_queries, dim = query.shape
        if roi_features.shape[0] != batch * num_queries:
            raise ValueError(
                f"roi_features has {roi_features.shape[0]} rows, expected "
                f"B*N = {batch}*{num_queries}"
            )

        # Step 2: attention only among the queries of one image (batch_first, B images);
        # no positional encoding, so the stage is permutation-equivariant in the queries.
        attn = self.self_attn(query, query, query, need_weights=False)[0]
        attn_feats = self.self_attn_norm(query + attn)

        # Steps 3-4: each query filters its own RoI feature.
        flat = attn_feats.reshape(batch * num_queries, dim)
        interact = self.instance_interaction(flat, roi_features)
        q = self.instance_interaction_norm(flat + self.instance_interaction_dropout(interact))

        # Step 5.
        object_feats = self.ffn_norm(q + self.ffn(q))

        # Steps 6-7.
        cls_logits = self.cls_score(self.cls_fcs(object_feats))
        bbox_deltas = self.bbox_pred(self.reg_fcs(object_feats))

        def unflatten(x: Tensor) -> Tensor:
            return x.view(batch, num_queries, x.shape[-1])

        return unflatten(cls_logits), unflatten(bbox_deltas), unflatten(object_feats), attn_feats

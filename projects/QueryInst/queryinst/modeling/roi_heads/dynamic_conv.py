"""Dynamic instance interaction ("DynamicConv"), shared by the box and mask stages.

docs/method.md §1.3, step 3 (with the projection) and §1.4 (without it);
paper section 3.2 ("dynamic interaction"), inherited from Sparse R-CNN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DynamicConv"]


class DynamicConv(nn.Module):
    """Filters each RoI feature with two 1x1 "convolutions" generated from its own query.

    For every instance r, a linear layer maps the query q_r (D,) to the parameters of two
    per-instance linear maps, ``param_in`` (D, dyn) and ``param_out`` (dyn, D), which are
    applied to the S*S spatial positions of that instance's RoI feature:
    ``x -> ReLU(LN(ReLU(LN(x @ param_in)) @ param_out))``. With ``with_proj`` the result is
    flattened (index = spatial * D + channel) and projected back to one D-vector
    (box stage); without it the per-position features are returned (mask stage).

    docs/method.md §1.3, step 3, and §1.4 (the variant without projection).

    Args:
        hidden_dim: D, the query / RoI feature channel count.
        dynamic_dim: dyn, the channel count between the two dynamic maps.
        pooler_resolution: S, the side of the RoIAlign output (7 for boxes, 14 for masks).
        with_proj: whether to add the final Linear(S*S*D -> D) + LayerNorm + ReLU.
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        dynamic_dim: int = 64,
        pooler_resolution: int = 7,
        with_proj: bool = True,
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.dynamic_dim = dynamic_dim
        self.pooler_resolution = pooler_resolution
        self.with_proj = with_proj

        self.dynamic_layer = nn.Linear(hidden_dim, 2 * hidden_dim * dynamic_dim)
        self.norm_in = nn.LayerNorm(dynamic_dim)
        self.norm_out = nn.LayerNorm(hidden_dim)
        if with_proj:
            num_positions = pooler_resolution * pooler_resolution
            self.fc_layer = nn.Linear(num_positions * hidden_dim, hidden_dim)
            self.fc_norm = nn.LayerNorm(hidden_dim)

    def forward(self, query: Tensor, roi_features: Tensor) -> Tensor:
        """Applies the query-generated filters to the RoI features, instance by instance.

        Args:
            query: (R, D) float tensor, one query per RoI (R may be 0).
            roi_features: (R, D, S, S) float tensor, RoIAlign output; row r belongs to
                query r. Same dtype and device as ``query``.

        Returns:
            (R, D) tensor when ``with_proj``, else (R, S*S, D) with positions in
            row-major (y, x) order. Same dtype as the inputs. Features, no units.

        Raises:
            ValueError: if the shapes do not match (R, D) and (R, D, S, S).
        """
        num_rois = query.shape[0]
        dim, res, dyn = self.hidden_dim, self.pooler_resolution, self.dynamic_dim
        if query.shape != (num_rois, dim) or roi_features.shape != (num_rois, dim, res, res):
            raise ValueError(
                f"expected query ({num_rois}, {dim}) and roi_features "
                f"({num_rois}, {dim}, {res}, {res}); got {tuple(query.shape)} and "
                f"{tuple(roi_features.shape)}"
            )

        params = self.dynamic_layer(query)
        # Explicit R instead of -1 in view(): -1 cannot be inferred when R == 0.
        param_in = params[:, : dim * dyn].view(num_rois, dim, dyn)
        param_out = params[:, dim * dyn :].view(num_rois, dyn, dim)

        # (R, D, S, S) -> (R, S*S, D): spatial-major, so each position is a row vector.
        x = roi_features.flatten(2).transpose(1, 2)
        x = F.relu(self.norm_in(torch.bmm(x, param_in)))
        x = F.relu(self.norm_out(torch.bmm(x, param_out)))
        if not self.with_proj:
            return x
        # flatten(1) of (R, S*S, D) puts element (s, c) at s * D + c, the layout the
        # official fc_layer weights expect.
        return F.relu(self.fc_norm(self.fc_layer(x.flatten(1))))

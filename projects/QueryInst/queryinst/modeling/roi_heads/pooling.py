"""Multi-level RoIAlign as one weighted gather-sum: the RoI pooling path of the ROI heads.

RoIAlign is linear in the feature maps: each output bin is a fixed weighted sum of
``4 * sampling_ratio**2`` input pixels (bilinear interpolation at the sampling points of the
bin, averaged), the same weights for every channel. :class:`MatrixROIPooler` computes these
(pixel, weight) pairs for every RoI at its FPN level, in one vectorised pass, and pools with
one ``F.embedding_bag`` (weighted sum of rows) over the levels' maps flattened channels-last.
In matrix terms: pooled = A @ maps with a sparse A of ``4 * sampling_ratio**2`` entries per
row; its backward is A^T @ grad, a second ``embedding_bag`` over the entries grouped by
input row (:class:`WeightedRowSum`).

Same values as Detectron2's ``ROIPooler`` with torchvision's ``roi_align`` (up to float
summation order), same level assignment. Why: on the CPU, torchvision's RoIAlign recomputes
the bilinear weights for every channel and runs one call per level, and its backward
scatters value by value into a zero-filled full-size gradient per level and call (4 levels
x 12 calls in a QueryInst training step). Here each weight is computed once and applied to
all channels at once, and one call serves all levels.

On other devices (CUDA), and in traced graphs (export), the pooler runs Detectron2's
``ROIPooler`` instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from detectron2.modeling.poolers import (
    ROIPooler,
    assign_boxes_to_levels,
    convert_boxes_to_pooler_format,
)
from detectron2.structures import Boxes
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "FlatMaps", "MatrixROIPooler", "PooledFeatures", "WeightedRowSum", "roi_align_weights",
]


@dataclass
class FlatMaps:
    """FPN maps stacked channels-last into one matrix, the rows that RoIAlign sums.

    Attributes:
        data: float (sum_l B * H_l * W_l, C); row ``offsets[l] + (b * H_l + y) * W_l + x``
            holds level l's map of image b at pixel (y, x).
        sizes: per level, (H_l, W_l).
        offsets: per level, the first row of that level in ``data``.
        batch_size: B.
        dtype: the maps' dtype. ``data`` is float32 for half-precision maps (as torchvision's
            RoIAlign computes under autocast), else that dtype; the output gets it back.
    """

    data: Tensor
    sizes: list[tuple[int, int]]
    offsets: list[int]
    batch_size: int
    dtype: torch.dtype

    @classmethod
    def from_maps(cls, maps: list[Tensor]) -> "FlatMaps":
        """Flatten NCHW maps (B, C, H_l, W_l) of one batch, finest first; one copy of each."""
        sizes = [(m.shape[2], m.shape[3]) for m in maps]
        rows = [m.shape[0] * h * w for m, (h, w) in zip(maps, sizes)]
        offsets = [sum(rows[:i]) for i in range(len(rows))]
        dtype = maps[0].dtype
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        data = torch.cat(
            [m.to(compute).permute(0, 2, 3, 1).reshape(-1, m.shape[1]) for m in maps]
        )
        return cls(data, sizes, offsets, maps[0].shape[0], dtype)


def _axis(coord: Tensor, length: Tensor):
    """torchvision's bilinear rule along one axis for sample coordinates ``coord``.

    Args:
        coord: float (...), sample positions in the level's pixels.
        length: int64 (...), broadcastable, the map's size along this axis.

    Returns:
        (valid, low, high, w_low, w_high): valid is False where the sample lies outside
        [-1, length] (it then contributes zero); low/high are the neighbouring indices
        (both ``length - 1`` at the far border) and w_low/w_high their weights.
    """
    valid = (coord >= -1.0) & (coord <= length)  # False for NaN too
    coord = torch.where(valid, coord, 0).clamp(min=0)  # indices stay in range; weight is 0
    low = coord.long()  # coord >= 0: truncation is floor
    at_end = low >= length - 1
    low = torch.where(at_end, length - 1, low)
    high = torch.where(at_end, low, low + 1)
    coord = torch.where(at_end, low.to(coord.dtype), coord)
    w_high = coord - low
    return valid, low, high, 1 - w_high, w_high


def roi_align_weights(
    rois: Tensor,
    levels: Tensor,
    maps: FlatMaps,
    scales: list[float],
    output_size: int,
    sampling_ratio: int,
    aligned: bool = True,
) -> tuple[Tensor, Tensor]:
    """The RoIAlign weights of ``rois``: which rows of ``maps.data`` each output bin sums.

    Row ``(r * S + i) * S + j`` of the result is output bin (i, j) of RoI r. The weights
    follow torchvision's ``roi_align`` exactly: a grid of ``sampling_ratio`` x
    ``sampling_ratio`` points per bin, bilinear interpolation with its border rules, the
    average over the points (out-of-map points count in the average with weight 0). A pixel
    may appear more than once in a row (neighbouring points share corners; at the far border
    both corners are the last pixel): its weights add up.

    Args:
        rois: float (R, 5), (batch index, x0, y0, x1, y1) in input-image pixels.
        levels: int64 (R,), index into ``scales`` / ``maps.sizes`` of each RoI's level. A RoI
            with a level outside them (a NaN box) or a non-finite coordinate gets weight 0:
            a zero output, as Detectron2's ``ROIPooler`` gives a box that no level takes.
        maps: the flattened maps the columns refer to.
        scales: per level, 1 / stride.
        output_size: S.
        sampling_ratio: points per bin side (> 0).
        aligned: RoIAlignV2's half-pixel offset (Detectron2's ``ROIAlignV2``); without it,
            RoIs are at least 1 pixel wide (legacy ``ROIAlign``).

    Returns:
        (index, weights): int64 and ``maps.data``'s dtype, both (R * S * S, K) with
        K = 4 * sampling_ratio**2; output bin = sum_k weights[:, k] * maps.data[index[:, k]].
    """
    device = rois.device
    n = output_size
    dtype = maps.data.dtype
    # Boxes are constants of RoIAlign, as in torchvision (no gradient flows into them).
    rois = rois.detach().to(dtype)
    usable = (levels >= 0) & (levels < len(scales)) & torch.isfinite(rois).all(1)
    levels = torch.where(usable, levels, 0)
    rois = torch.where(usable[:, None], rois, 0)
    scale = torch.tensor(scales, dtype=dtype, device=device)[levels]
    height = torch.tensor([h for h, _ in maps.sizes], device=device)[levels]
    width = torch.tensor([w for _, w in maps.sizes], device=device)[levels]
    offset = torch.tensor(maps.offsets, device=device)[levels]
    shift = 0.5 if aligned else 0.0
    x0, y0 = rois[:, 1] * scale - shift, rois[:, 2] * scale - shift
    roi_w, roi_h = rois[:, 3] * scale - shift - x0, rois[:, 4] * scale - shift - y0
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / n, roi_h / n

    # Sample positions along each axis: (R, S, sampling_ratio).
    cell = torch.arange(n, dtype=dtype, device=device)[None, :, None]
    point = torch.arange(sampling_ratio, dtype=dtype, device=device)[None, None, :] + 0.5
    bin_h, bin_w = bin_h[:, None, None], bin_w[:, None, None]
    ys = y0[:, None, None] + cell * bin_h + point * bin_h / sampling_ratio
    xs = x0[:, None, None] + cell * bin_w + point * bin_w / sampling_ratio
    valid_y, y_lo, y_hi, wy_lo, wy_hi = _axis(ys, height[:, None, None])
    valid_x, x_lo, x_hi, wx_lo, wx_hi = _axis(xs, width[:, None, None])

    def along_y(t):  # (R, S, sr) -> (R, S, 1, sr, 1): bin row i, sample row
        return t[:, :, None, :, None]

    def along_x(t):  # (R, S, sr) -> (R, 1, S, 1, sr): bin column j, sample column
        return t[:, None, :, None, :]

    # Map row of each y index: offset + (b * H + y) * W, shape (R, S, 1, sr, 1).
    batch = rois[:, 0].long()
    first = offset[:, None, None, None, None]
    row_lo = first + ((batch * height)[:, None, None, None, None] + along_y(y_lo)) * width[
        :, None, None, None, None
    ]
    row_hi = first + ((batch * height)[:, None, None, None, None] + along_y(y_hi)) * width[
        :, None, None, None, None
    ]
    cols = torch.stack(
        torch.broadcast_tensors(
            row_lo + along_x(x_lo), row_lo + along_x(x_hi),
            row_hi + along_x(x_lo), row_hi + along_x(x_hi),
        ),
        dim=-1,
    )  # (R, S, S, sr, sr, 4)
    weights = torch.stack(
        torch.broadcast_tensors(
            along_y(wy_lo) * along_x(wx_lo), along_y(wy_lo) * along_x(wx_hi),
            along_y(wy_hi) * along_x(wx_lo), along_y(wy_hi) * along_x(wx_hi),
        ),
        dim=-1,
    )
    valid = (along_y(valid_y) & along_x(valid_x) & usable[:, None, None, None, None])[..., None]
    weights = torch.where(valid, weights, 0.0) / (sampling_ratio * sampling_ratio)
    per_bin = 4 * sampling_ratio * sampling_ratio
    return cols.reshape(-1, per_bin), weights.reshape(-1, per_bin)


class WeightedRowSum(torch.autograd.Function):
    """``out[i] = sum_k weights[i, k] * data[index[i, k]]`` with a gather-based backward.

    The forward is ``F.embedding_bag(mode="sum")``. Its autograd backward on the CPU
    (``_embedding_bag_dense_backward``) cost ~65 ms a call on the 600 x 49 box bins of a
    300-query training step (more than the forward and the sort together), ~0.26 s a step
    in all. Here the backward sorts the entries by input row (the same ``torch.sort`` as
    autograd's, so each row's entries add in the same order) and sums each row's
    (bin, weight) entries with a second ``embedding_bag``: dL/d data = A^T @ dL/d out, the
    same float values bit for bit, ~2x faster.

    Args (of ``apply``):
        data: float (N, C), the rows (``FlatMaps.data``).
        index: int64 (M, K), rows in [0, N).
        weights: float (M, K), ``data``'s dtype; constants (no gradient flows into them:
            RoIAlign's boxes are not differentiated, as in torchvision).

    Returns:
        float (M, C).

    Raises:
        ValueError: ``weights`` requires a gradient (this backward computes none for it,
            and a silent None would be a wrong gradient).
    """

    @staticmethod
    def forward(ctx, data: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        if ctx.needs_input_grad[2]:
            raise ValueError("WeightedRowSum: weights must be constants (detach them); only "
                             "data gets a gradient")
        ctx.save_for_backward(index, weights)
        ctx.rows = data.shape[0]
        return F.embedding_bag(index, data, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, weights = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        per_bin = index.shape[1]
        rows, order = torch.sort(index.reshape(-1))
        rows, counts = torch.unique_consecutive(rows, return_counts=True)
        grad_rows = F.embedding_bag(
            order.div(per_bin, rounding_mode="floor"), grad.contiguous(),
            offsets=counts.cumsum(0) - counts,
            per_sample_weights=weights.reshape(-1)[order], mode="sum",
        )
        grad_data = grad.new_zeros((ctx.rows, grad.shape[1]))
        grad_data.index_copy_(0, rows, grad_rows)
        return grad_data, None, None


class PooledFeatures(dict):
    """The FPN maps the ROI heads pool from, by name, and the pooler input made from them.

    All RoI poolings of one forward pass (six box stages, the mask head) read the same maps.
    The input a pooler makes of them (``MatrixROIPooler.prepare``: flattened maps, or
    NCHW-contiguous ones) is made at the first call and reused by the others, keyed by the
    pooler's class: with channels-last maps a second flattening cost ~35 ms and an NCHW copy
    ~110 ms per 800x1333 image (docs/benchmark.md). Built per forward pass, so nothing
    outlives it.

    Args:
        maps: name -> float (B, C, H_l, W_l) map, any memory format.
    """

    def __init__(self, maps: dict[str, Tensor]):
        super().__init__(maps)
        self._inputs: dict[type, object] = {}

    def pooler_input(self, pooler: nn.Module, names: list[str]):
        """What ``pooler`` reads from the maps ``names`` (finest first): its ``prepare``'s
        result (made once per pooler class), or the NCHW-contiguous maps for poolers without
        one (Detectron2's ``ROIPooler``)."""
        key = type(pooler)
        if key not in self._inputs:
            x = [self[name] for name in names]
            prepare = getattr(pooler, "prepare", None)
            self._inputs[key] = prepare(x) if prepare else [m.contiguous() for m in x]
        return self._inputs[key]


class MatrixROIPooler(nn.Module):
    """Detectron2's multi-level ``ROIPooler`` (RoIAlign / RoIAlignV2 with a fixed sampling
    ratio), computed on the CPU as one weighted gather-sum per call, all levels at once.

    Call it like ``ROIPooler``: ``pooler(x, box_lists)`` with ``x`` the NCHW maps (finest
    first). Several calls on the same maps can share their flattening: pass
    ``pooler.prepare(x)`` instead of ``x``.

    Args:
        output_size: S, the side of the pooled features.
        scales: per level, 1 / stride (finest first, consecutive powers of 2).
        sampling_ratio: sampling points per bin side, > 0.
        pooler_type: "ROIAlignV2" (aligned) or "ROIAlign".
        canonical_box_size, canonical_level: FPN level assignment, as ``ROIPooler``.

    Raises:
        ValueError: for another pooler type or a sampling ratio <= 0 (adaptive).
    """

    def __init__(
        self,
        output_size: int,
        scales: tuple[float, ...],
        sampling_ratio: int,
        pooler_type: str = "ROIAlignV2",
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__()
        if pooler_type not in ("ROIAlignV2", "ROIAlign"):
            raise ValueError(f"MatrixROIPooler computes RoIAlign only, not {pooler_type}")
        if sampling_ratio <= 0:
            raise ValueError("MatrixROIPooler needs a fixed sampling ratio (> 0)")
        self.output_size = output_size
        self.scales = list(scales)
        self.sampling_ratio = sampling_ratio
        self.aligned = pooler_type == "ROIAlignV2"
        self.min_level = int(-math.log2(scales[0]))
        self.max_level = int(-math.log2(scales[-1]))
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        # The same pooling with torchvision's kernels, for maps on other devices.
        self.fallback = ROIPooler(
            output_size, scales, sampling_ratio, pooler_type,
            canonical_box_size=canonical_box_size, canonical_level=canonical_level,
        )

    def prepare(self, x: list[Tensor]) -> FlatMaps | list[Tensor]:
        """What the calls on maps ``x`` share: the flattened maps on the CPU, else ``x``
        NCHW-contiguous (torchvision's RoIAlign would copy channels-last maps in every call).

        It depends on ``x`` only, not on this pooler's settings: poolers of this class may
        share it (``PooledFeatures``).

        While tracing (``torch.jit.trace``, ONNX export: ``queryinst/export/exporter.py``) it is the
        maps too, so the graph holds torchvision's RoIAlign (ONNX ``RoiAlign``): ``FlatMaps``
        keeps the map sizes as Python ints, which a trace would freeze to the traced
        input's size.
        """
        if x[0].device.type == "cpu" and not torch.jit.is_tracing():
            return FlatMaps.from_maps(x)
        return [m.contiguous() for m in x]

    def forward(self, x: list[Tensor] | FlatMaps, box_lists: list[Boxes]) -> Tensor:
        """
        Args:
            x: NCHW maps (B, C, H_l, W_l) per level, or :meth:`prepare`'s result for them.
            box_lists: B Boxes, absolute xyxy in input-image pixels.

        Returns:
            Tensor: (M, C, S, S) in the maps' dtype, M the boxes of all images in order. On
            the CPU it is a channels-last view of an (M, S, S, C) tensor.
        """
        if not isinstance(x, FlatMaps):
            x = self.prepare(x)
            if not isinstance(x, FlatMaps):
                return self.fallback(x, box_lists)
        if len(box_lists) != x.batch_size:
            raise ValueError(f"{len(box_lists)} box lists for a batch of {x.batch_size}")
        channels, n = x.data.shape[1], self.output_size
        rois = convert_boxes_to_pooler_format(box_lists)
        if len(x.sizes) == 1:
            levels = torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
        else:
            levels = assign_boxes_to_levels(
                box_lists, self.min_level, self.max_level,
                self.canonical_box_size, self.canonical_level,
            )
        index, weights = roi_align_weights(
            rois, levels, x, self.scales, n, self.sampling_ratio, self.aligned
        )
        pooled = WeightedRowSum.apply(x.data, index, weights)
        return pooled.view(len(rois), n, n, channels).permute(0, 3, 1, 2).to(x.dtype)

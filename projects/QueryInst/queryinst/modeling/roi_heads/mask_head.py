"""One mask stage of QueryInst: the "DynamicMaskHead".

docs/method.md §1.4; paper section 3.2 (dynamic mask head driven by the same stage's
query). RoIAlign of the stage's boxes is done by the caller.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch.nn.functional as F
from detectron2.layers import NaiveSyncBatchNorm
from torch import Tensor, nn

from .dynamic_conv import DynamicConv

__all__ = ["DynamicMaskHead"]

# Norm name -> layer constructor (channels -> module); None means no norm (and the convs
# keep their bias). "SyncBN" is Detectron2's all_reduce-based BatchNorm, not
# nn.SyncBatchNorm, which refuses CPU tensors under a process group (gloo). stats_mode "N"
# weights each process by its RoI count: a process's M differs from its neighbours' and may
# be 0, and the RoIs are all S x S, so the statistics are those of all RoIs of all processes.
_NORMS: dict[str, Callable[[int], nn.Module] | None] = {
    "": None,
    "BN": nn.BatchNorm2d,
    "SyncBN": functools.partial(NaiveSyncBatchNorm, stats_mode="N"),
}


def _channels_last(weight: Tensor) -> bool:
    """Whether a conv weight has channels-last strides (not merely NCHW ones)."""
    return weight.dim() == 4 and weight.stride(1) == 1 and weight.shape[1] > 1


class DynamicMaskHead(nn.Module):
    """Predicts class-specific 28x28 mask logits from 14x14 RoI features and the stage query.

    The stage's ``attn_feats`` generate a :class:`DynamicConv` (without projection) that
    replaces each RoI feature; then ``num_convs`` x [3x3 conv, norm, ReLU], a 2x2 stride-2
    transposed conv + ReLU and a 1x1 conv to C channels.

    docs/method.md §1.4; init from docs/method.md §2.3.

    Args:
        num_classes: C, number of mask channels (one per foreground class).
        hidden_dim: D, query and RoI feature channels.
        dynamic_dim: inner width of the dynamic interaction.
        pooler_resolution: S, side of the RoI features (output side is 2*S).
        num_convs: number of 3x3 conv blocks.
        conv_dim: channels of the conv blocks and the transposed conv.
        norm: "BN" (nn.BatchNorm2d, statistics of this process's RoIs), "SyncBN"
            (Detectron2's ``NaiveSyncBatchNorm(stats_mode="N")``: in training under a
            process group of several processes, the mean and variance of the RoIs of all
            processes, by all_reduce, on CUDA (NCCL) or CPU (gloo); otherwise nn.BatchNorm2d)
            or "" (none). Both norms have nn.BatchNorm2d's parameter and buffer names
            (official checkpoints load into either). Differences from nn.SyncBatchNorm,
            under several processes only: the running variance is updated with the biased
            variance of the batch, smaller by (n - 1) / n than the unbiased one for n
            values per channel (n = all processes' RoIs x S x S), and
            ``num_batches_tracked`` stays as loaded (it is only used with momentum None).

    Raises:
        ValueError: for an unknown ``norm``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        hidden_dim: int = 256,
        dynamic_dim: int = 64,
        pooler_resolution: int = 14,
        num_convs: int = 4,
        conv_dim: int = 256,
        norm: str = "BN",
    ):
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {sorted(_NORMS)}")
        norm_cls = _NORMS[norm]
        self.hidden_dim = hidden_dim
        self.pooler_resolution = pooler_resolution

        self.instance_interaction = DynamicConv(
            hidden_dim, dynamic_dim, pooler_resolution, with_proj=False
        )

        self.mask_convs = nn.ModuleList()
        in_dim = hidden_dim
        for _ in range(num_convs):
            # A bias before a norm is redundant; keep it only when there is no norm.
            layers: list[nn.Module] = [
                nn.Conv2d(in_dim, conv_dim, 3, padding=1, bias=norm_cls is None)
            ]
            if norm_cls is not None:
                layers.append(norm_cls(conv_dim))
            layers.append(nn.ReLU(inplace=True))
            self.mask_convs.append(nn.Sequential(*layers))
            in_dim = conv_dim

        self.deconv = nn.ConvTranspose2d(in_dim, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)

        self._init_weights()

    def _init_weights(self) -> None:
        """docs/method.md §2.3: xavier_uniform_ on every parameter with dim > 1, predictor bias 0.

        Other biases (dynamic layer, deconv, convs without norm) keep PyTorch's default
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in the official code; norms keep weight 1,
        bias 0.
        """
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, roi_features: Tensor, attn_feats: Tensor) -> Tensor:
        """Computes mask logits for M RoIs.

        Args:
            roi_features: (M, D, S, S) float tensor, RoIAlign (S = 14) of the detached
                boxes output by the same stage; M may be 0.
            attn_feats: (M, D) float tensor, that stage's post-self-attention queries of
                the same RoIs (not detached, so the mask loss trains the box stages too).

        Returns:
            (M, C, 2S, 2S) mask logits, i.e. (M, C, 28, 28) by default; same dtype as the
            inputs. Apply sigmoid for probabilities.

        Raises:
            ValueError: if the shapes do not match (M, D, S, S) and (M, D).
        """
        num_rois = roi_features.shape[0]
        res = self.pooler_resolution
        x = self.instance_interaction(attn_feats, roi_features)
        # (M, S*S, D) -> (M, D, S, S); this replaces the RoI feature (no residual). The
        # permuted view has channels-last strides: kept when the convs run channels-last
        # (INFERENCE_MEMORY_FORMAT swaps all their weights at once), else copied to NCHW.
        x = x.view(num_rois, res, res, self.hidden_dim).permute(0, 3, 1, 2)
        if not _channels_last(self.deconv.weight):
            x = x.contiguous()
        for block in self.mask_convs:
            x = block(x)
        x = F.relu(self.deconv(x), inplace=True)
        return self.predictor(x)

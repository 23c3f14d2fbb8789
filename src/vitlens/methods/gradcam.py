"""Grad-CAM and relatives: class activation maps from one layer's activations and gradients.

With a (B, C, h, w) activation map a of the target layer and g = d y_c / d a:

    Grad-CAM   (Selvaraju et al. 2017)   w_k = mean_ij g_kij
    Grad-CAM++ (Chattopadhay et al. 2018) alpha_kij = g^2 / (2 g^2 + (sum_ij a_kij) g^3 + 1e-6),
                                          alpha = 0 where g = 0,   w_k = sum_ij relu(g_kij) alpha_kij
    XGrad-CAM  (Fu et al. 2020)          w_k = sum_ij g_kij a_kij / (sum_ij a_kij + 1e-7)
    cam = relu(sum_k w_k a_k)

    LayerCAM   (Jiang et al. 2021)       cam = relu(sum_k relu(g_k) * a_k)   (element-wise weights)

These are the formulas of pytorch-grad-cam (Grad-CAM++ in its first-order closed form). For a ViT
the target layer is the last block's pre-attention LayerNorm output with the prefix tokens dropped
and the patches laid on the real grid (the last block's output would have zero patch gradients:
only the class token reaches the head). With several target layers the per-layer maps are
min-max normalised, brought to the finest grid (bilinear) and averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitlens.methods.common import Captured, minmax


def gradcam_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return g.mean(dim=(2, 3))


def gradcam_pp_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    g2 = g * g
    g3 = g2 * g
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return (g.clamp_min(0) * alpha).sum(dim=(2, 3))


def xgradcam_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    return (g * a / (sum_a + 1e-7)).sum(dim=(2, 3))


def _weighted_cam(a, g, weights_fn):
    weights = weights_fn(a, g)
    return torch.einsum("bk,bkhw->bhw", weights, a).clamp_min(0)


def _layer_cam(a, g):
    return (g.clamp_min(0) * a).sum(dim=1).clamp_min(0)


def _fuse(cams: list) -> torch.Tensor:
    if len(cams) == 1:
        return cams[0]
    size = max((c.shape[-2:] for c in cams), key=lambda s: s[0] * s[1])
    scaled = [F.interpolate(minmax(c).unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
              for c in cams]
    return torch.stack(scaled).mean(dim=0)


def _cams(captured: Captured, layers, make) -> torch.Tensor:
    chosen = captured.cam_layers if layers in (None, "default") else _as_list(layers)
    return _fuse([make(*captured.cam[name]) for name in chosen])


def _as_list(layers):
    return [s.strip() for s in layers.split(",")] if isinstance(layers, str) else list(layers)


def gradcam(captured: Captured, layers=None) -> torch.Tensor:
    """Grad-CAM map (B, h, w) of the target layer(s)."""
    return _cams(captured, layers, lambda a, g: _weighted_cam(a, g, gradcam_weights))


def gradcam_pp(captured: Captured, layers=None) -> torch.Tensor:
    """Grad-CAM++ map (B, h, w)."""
    return _cams(captured, layers, lambda a, g: _weighted_cam(a, g, gradcam_pp_weights))


def xgradcam(captured: Captured, layers=None) -> torch.Tensor:
    """XGrad-CAM map (B, h, w)."""
    return _cams(captured, layers, lambda a, g: _weighted_cam(a, g, xgradcam_weights))


def layercam(captured: Captured, layers=None) -> torch.Tensor:
    """LayerCAM map (B, h, w)."""
    return _cams(captured, layers, _layer_cam)

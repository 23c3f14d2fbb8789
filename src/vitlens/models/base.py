"""What every model adapter offers the engine.

An adapter wraps a user's ``nn.Module`` without changing it. :class:`ExplainableModel` is what all
adapters share, whatever the input: the module and its class names, the attention layers and how
to capture their probabilities even under fused attention (:meth:`~ExplainableModel.capture`),
which token rows the explained score reads (:meth:`~ExplainableModel.readout_weights`, used to read
rollout-style matrices the way the model itself pools), and a scoped eval mode.

:class:`ImageModel` adds what images need: preprocessing, the patch grid, logits of a pixel batch,
a class score read out of any intermediate layer with the model's own final norm and head
(:meth:`ImageModel.layer_logits`, used by LeGrad) and the Grad-CAM target layers. The text
adapters (:class:`vitlens.text.base.TextModel`) are the other subclass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from vitlens.errors import MethodError, ModelError, TargetError
from vitlens.models.capture import AttentionRecorder
from vitlens.models.preprocess import Preprocess


@dataclass
class ModelInfo:
    """Provenance recorded in run manifests."""

    spec: str
    weights: str | None = None
    weights_sha256: str | None = None


class ExplainableModel:
    """Base class of every model adapter (images and text). Subclasses fill in the family-specific parts.

    Parameters
    ----------
    module : nn.Module
        The user's model; never modified (captures swap per-instance forwards or add hooks for the
        duration of one call only).
    class_names : sequence of str, optional
    info : ModelInfo, optional
    """

    family = "base"
    #: True for transformers whose attention vitlens can capture.
    has_attention = True

    def __init__(self, module: nn.Module, class_names: Sequence[str] | None = None, info: ModelInfo | None = None):
        self.module = module
        self.class_names = list(class_names) if class_names is not None else None
        self.info = info or ModelInfo(spec=f"module:{type(module).__name__}")

    # --- facts about the model -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        """Attention layers run per forward (the number of maps :meth:`capture` records)."""
        raise NotImplementedError

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches (CLS, distillation, registers); 0 for text (every token is scored)."""
        return 0

    def readout_weights(self, num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """(N,) weights over the token rows that the explained score reads (sums to 1); default: the first token."""
        weights = torch.zeros(num_tokens, device=device, dtype=dtype)
        weights[0] = 1.0
        return weights

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def to(self, device) -> "ExplainableModel":
        self.module.to(device)
        return self

    # --- classes ----------------------------------------------------------------------------
    def class_name(self, index: int) -> str:
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return f"class {index}"

    def class_index(self, name: str) -> int:
        """Index of a class given by name (case-insensitive; any comma-separated synonym)."""
        if self.class_names is None:
            raise TargetError(f"target class {name!r} given by name, but the model has no class names")
        wanted = name.strip().lower()
        for i, full in enumerate(self.class_names):
            if full.lower() == wanted:
                return i
        for i, full in enumerate(self.class_names):
            if wanted in (part.strip().lower() for part in full.split(",")):
                return i
        raise TargetError(f"unknown target class name {name!r} for this model ({len(self.class_names)} classes)")

    def check_class_index(self, index: int) -> int:
        n = self.num_classes
        if not 0 <= index < n:
            raise TargetError(f"target class {index} is out of range: the model has {n} classes (0-{n - 1})")
        return index

    def module_name(self, sub: nn.Module) -> str:
        for name, candidate in self.module.named_modules():
            if candidate is sub:
                return name
        raise ValueError("module is not part of this model")

    def spatial_layer_names(self) -> list[str]:
        """Layers whose output maps onto the input grid (Grad-CAM target layers); none by default."""
        return []

    def prepare(self) -> None:
        """Learn now what the adapter needs to know about the model (a dry run), so that its errors
        surface when the model is loaded; a no-op for adapters that read everything from the module."""

    def unsupported_methods(self) -> dict:
        """Methods this model cannot run although it has attention: ``{name: one-line reason}``.

        ``all`` leaves them out and asking for one by name is a one-line error before anything runs.
        """
        return {}

    # --- running it ------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        """Within the block, forwards report every layer's attention probabilities to ``recorder``."""
        raise NotImplementedError
        yield recorder  # pragma: no cover

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Explanations are defined for the model in eval mode; restore the user's mode after."""
        flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        try:
            yield
        finally:
            for m, flag in flags:
                m.training = flag

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.info.spec!r})"


class ImageModel(ExplainableModel):
    """Base class of the image adapters: preprocessing, patch grid, logits, layer scores, Grad-CAM layers."""

    def __init__(self, module: nn.Module, preprocess: Preprocess, class_names: Sequence[str] | None = None,
                 info: ModelInfo | None = None):
        super().__init__(module, class_names, info)
        self.preprocess = preprocess

    @property
    def patch_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def grid(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (h, w) for an input of the given (H, W)."""
        ph, pw = self.patch_size
        return input_hw[0] // ph, input_hw[1] // pw

    def fixed_input_size(self) -> tuple[int, int] | None:
        """(H, W) the model requires, or None when it accepts other sizes."""
        return None

    def check_input(self, x: torch.Tensor) -> None:
        fixed = self.fixed_input_size()
        if fixed is not None and tuple(x.shape[-2:]) != tuple(fixed):
            raise ModelError(
                f"input of {x.shape[-2]}x{x.shape[-1]} pixels does not fit the model, which takes {fixed[0]}x{fixed[1]}"
            )

    # --- Grad-CAM target layers --------------------------------------------------------------
    def default_cam_layers(self) -> list[str]:
        """The layer(s) Grad-CAM reads when none is named: for ViTs the last block's pre-attention norm."""
        return [self.block_norm_names()[-1]]

    def block_norm_names(self) -> list[str]:
        """Qualified names of each block's pre-attention norm (ViT Grad-CAM layers)."""
        raise NotImplementedError

    def spatial_layer_names(self) -> list[str]:
        return self.block_norm_names()

    def cam_spatial(self, activation: torch.Tensor, grid: tuple, layer: str) -> torch.Tensor:
        """A target layer's output as a (B, C, h, w) map: prefix tokens dropped, patches on the grid."""
        if activation.dim() == 4:
            return activation
        h, w = grid
        prefix = self.num_prefix_tokens
        if activation.dim() == 3 and activation.shape[1] == prefix + h * w:
            tokens = activation[:, prefix:]
            return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)
        raise MethodError(
            f"target layer '{layer}' gives shape {tuple(activation.shape)}, not {prefix}+{h}x{w} tokens: "
            f"choose one of {', '.join(self.spatial_layer_names()[-6:])}"
        )

    # --- running it ------------------------------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model on a preprocessed batch and return its (B, classes) logits."""
        raise NotImplementedError

    def layer_logits(self, hidden: torch.Tensor, pool: str = "model") -> torch.Tensor:
        """Class scores read out of a block's output with the model's own final norm and head.

        Parameters
        ----------
        hidden : Tensor
            (B, N, C) residual stream after some block.
        pool : {'model', 'mean'}
            ``'model'`` pools tokens exactly as the model does (CLS token, distillation average,
            patch mean...). ``'mean'`` averages all N tokens first (the official LeGrad choice):
            replacing every token by the mean makes any token pooling read that mean, and since
            the final norm acts per token this equals norm-then-head of the mean.
        """
        if pool == "mean":
            hidden = hidden.mean(dim=1, keepdim=True).expand_as(hidden)
        elif pool != "model":
            raise MethodError(f"unknown pool {pool!r}: expected 'model' or 'mean'")
        return self._head(hidden)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

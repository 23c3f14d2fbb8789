"""Adapter for timm ``Cait`` (CaiT: talking-heads self-attention over the patches, then class attention).

CaiT (Touvron et al., ICCV 2021) runs in two stages. ``blocks`` are layer-scaled self-attention
blocks over the P patch tokens only: there is no class token yet. Their attention
(``TalkingHeadAttn``) mixes the heads linearly twice, before and after the softmax::

    S_h = (q_h * scale) k_h^T                     (P, P) per head h
    T_h = sum_g W_l[h, g] S_g + b_l[h]             proj_l over the heads
    Q_h = softmax(T_h)                             rows sum to 1
    A_h = sum_g W_w[h, g] Q_g + b_w[h]             proj_w over the heads
    out_h = A_h v_h

Then ``blocks_token_only`` are class-attention blocks: only the class token queries, over
[cls, patches], and only the class token is updated (``x_cls += gamma_1 * ClassAttn(norm1([cls,
x]))``, then its MLP); the patch tokens leave the stage unchanged. ``norm`` and the head read the
class token (or, with ``global_pool='avg'``, the mean of the patch tokens).

How vitlens reads it (the methods see N = 1 + P tokens, the class token first, as for a ViT):

* **Patch-stage layers** (l < depth) are reported as (B, K, N, N) matrices ``E^l`` with the class
  token's row and column the identity's (it does not exist yet, so nothing flows into or out of
  it) and ``A^l`` on the patch block: ``E^l = [[1, 0], [0, A^l]]``.
* **Class-attention layers** (depth <= l < depth + depth_token_only) are reported as ``E^l`` whose
  only non-identity row is the class row, the class token's attention over [cls, patches]:
  ``E^l = [[a^l], [0, I_P]]`` (the patch tokens pass the stage unchanged).
* **The attention of a talking-heads layer is A_h**, the post-softmax, post-``proj_w`` mixture: the
  tensor that multiplies the values. Its rows sum to ``sum_g W_w[h, g] + P b_w[h]``, not to 1, and
  its entries may be negative; rollout's ``rownorm(A_bar + alpha I)`` then divides by that sum plus
  alpha, which is meaningful where it is positive.
* Rollout, GMAR, GMAR++ and Chefer compose these (N, N) matrices as usual and read the class row
  (or the patch rows, with average pooling): with the class readout the map is
  ``rho[1:] R_P``, where ``R_P`` is the composition over the patch stage and ``rho`` the class row of
  the composition over the class-attention stage. ``attention`` reads one layer's class row: the
  last class-attention layer by default; a patch-stage layer gives an all-zero map (no class token).
* Both tensors are built from the graph tensor the forward uses (by padding), and the forward
  multiplies the values by the recorded tensor itself (``E^l[1:, 1:] v`` in the patch stage,
  ``E^l[:1] v`` in class attention), so ``d score / d E^l`` is the gradient of the reported tensor:
  ``d score / d A^l`` on the patch block (``d score / d a^l`` on the class row) and 0 elsewhere.
* **LeGrad** scores every layer (``layers='all'`` is all depth + depth_token_only of them). A
  class-attention layer's score is the head on its token states ``[cls^l, patches]`` (the class token
  after that block, the final patch tokens): ``head(norm(cls^l))`` with token pooling. A patch-stage
  layer has no class token to read, so its score is the rest of the model's readout on its patch
  states: the class token through every class-attention block (``forward_cls``), then ``norm`` and
  the head, as if the patch stage ended there (so the last patch layer's score is the logit, like
  the last class-attention layer's). ``pool='mean'`` is ``head(norm(mean of the layer's tokens))``:
  the P patch tokens of a patch-stage layer, [cls^l, patches] of a class-attention layer.
* **AttnLRP / CP-LRP** are refused: their attention rules (the recorder's ``attend``) are written for
  ``softmax(q k^T) v``, and the talking-heads mixing between the scores, the softmax and the values
  is outside that form.
* **Grad-CAM**: the last patch block's ``norm1`` by default (P tokens, no prefix); a class-attention
  block's ``norm1`` ([cls, patches]) can be named too, its class token dropped.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vitlens.errors import MethodError, ModelError
from vitlens.models.capture import AttentionRecorder, attribute_set, swapped_forward
from vitlens.models.registry import Family, register_family
from vitlens.models.timm_blocks import TimmBlocksModel
from vitlens.models.timm_vit import timm_preprocess

SUPPORTED_POOLS = ("token", "avg")
#: the Cait methods whose behaviour the capture and ``_head`` rely on as timm writes them
READ_METHODS = ("forward", "forward_features", "forward_cls", "forward_head")
LRP_REASON = ("timm CaiT's talking-heads attention mixes its heads before and after the softmax, which the "
              "AttnLRP / CP-LRP attention rules (softmax(q k^T) v) do not cover: use the other methods")


def is_timm_cait(module: nn.Module) -> bool:
    try:
        from timm.models.cait import Cait
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(module, Cait)


def _check_model(module: nn.Module) -> None:
    from timm.models.cait import Cait, ClassAttn, LayerScaleBlockClassAttn, TalkingHeadAttn

    for name in READ_METHODS:
        if getattr(type(module), name, None) is not getattr(Cait, name, None):
            raise ModelError(f"unsupported CaiT variant {type(module).__name__}: it overrides Cait.{name}, "
                             "which vitlens reads as timm writes it")
    pool = module.global_pool
    if pool not in SUPPORTED_POOLS:
        # global_pool='' returns per-token outputs: there is no class score to explain
        raise ModelError(f"timm CaiT global_pool={pool!r} is not supported: vitlens supports "
                         f"{', '.join(SUPPORTED_POOLS)}")
    if module.blocks_token_only is None or module.cls_token is None:
        # prune_intermediate_layers removes the class token and the class-attention stage with the head
        raise ModelError("timm CaiT without its class token and class-attention blocks has no class score")
    for i, block in enumerate(module.blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, TalkingHeadAttn) or type(attn).forward is not TalkingHeadAttn.forward:
            kind = f"{type(attn).__module__}.{type(attn).__name__}"
            raise ModelError(f"unsupported attention implementation {kind} in block {i}: vitlens reads timm's "
                             "CaiT TalkingHeadAttn (qkv, proj_l, softmax, proj_w, proj)")
    for j, block in enumerate(module.blocks_token_only):
        attn = getattr(block, "attn", None)
        own = LayerScaleBlockClassAttn.forward
        if not isinstance(block, LayerScaleBlockClassAttn) or type(block).forward is not own:
            raise ModelError(f"unsupported class-attention block {type(block).__name__} in blocks_token_only.{j}: "
                             "vitlens reads timm's LayerScaleBlockClassAttn")
        if not isinstance(attn, ClassAttn) or type(attn).forward is not ClassAttn.forward:
            kind = f"{type(attn).__module__}.{type(attn).__name__}"
            raise ModelError(f"unsupported attention implementation {kind} in blocks_token_only.{j}: vitlens "
                             "reads timm's CaiT ClassAttn (q of the class token, k, v, proj)")


class TimmCait(TimmBlocksModel):
    """timm ``Cait`` (``cait_*``): talking-heads patch blocks, then class-attention blocks.

    Layers are the ``depth`` patch blocks followed by the ``depth_token_only`` class-attention blocks.
    Every layer is reported as a (B, K, N, N) matrix over [cls, patches]: a patch-stage layer as
    ``[[1, 0], [0, A]]`` (the class token does not exist yet: identity row and column), where A is
    the talking-heads attention *after* ``proj_w`` (the tensor that multiplies the values; its rows
    sum to ``sum_g W_w[h, g] + P b_w[h]``, not 1); a class-attention layer as the identity with its
    class row replaced by the class token's attention over [cls, patches] (the patch tokens are not
    updated there). The forward multiplies the values by the reported tensor itself, so gradients
    with respect to it are the gradients of the attention. LeGrad scores a patch-stage layer through
    the class-attention stage, norm and head (``forward_cls``: the class token does not exist before),
    a class-attention layer through norm and head. AttnLRP / CP-LRP are refused (talking heads).
    See docs/methods.md, "timm CaiT".
    """

    family = "timm-cait"

    def __init__(self, module, preprocess, class_names=None, info=None):
        super().__init__(module, preprocess, class_names, info)
        _check_model(module)

    # --- facts ------------------------------------------------------------------------------------
    @property
    def num_patch_layers(self) -> int:
        return len(self.module.blocks)

    @property
    def num_layers(self) -> int:
        return len(self.module.blocks) + len(self.module.blocks_token_only)

    @property
    def num_patches(self) -> int:
        # the position embedding is built for one grid (fixed_input_size): P is the model's own
        return int(self.module.pos_embed.shape[1])

    def unsupported_methods(self) -> dict:
        return {"attnlrp": LRP_REASON, "cp-lrp": LRP_REASON}

    # --- Grad-CAM ----------------------------------------------------------------------------------
    def block_norm_names(self):
        return [f"blocks.{i}.norm1" for i in range(self.num_patch_layers)]

    def spatial_layer_names(self):
        # a class-attention block's norm1 reads [cls, final patches]: spatial once the class token is dropped
        return self.block_norm_names() + [f"blocks_token_only.{j}.norm1"
                                          for j in range(len(self.module.blocks_token_only))]

    def cam_spatial(self, activation, grid, layer):
        h, w = grid
        if activation.dim() == 3 and activation.shape[1] == h * w:
            # a patch-stage layer: P tokens and no prefix (the class token joins only in class attention)
            return activation.reshape(activation.shape[0], h, w, activation.shape[-1]).permute(0, 3, 1, 2)
        return super().cam_spatial(activation, grid, layer)

    # --- LeGrad ------------------------------------------------------------------------------------
    def layer_logits(self, hidden, pool="model"):
        if pool == "mean":
            # every token replaced by the mean of the layer's tokens (P patch tokens in the patch stage,
            # [cls, patches] after a class-attention block): any pooling reads that mean, and the final
            # norm acts per token, so this is head(norm(mean))
            hidden = hidden.mean(dim=1, keepdim=True).expand(-1, 1 + self.num_patches, -1)
        elif pool != "model":
            raise MethodError(f"unknown pool {pool!r}: expected 'model' or 'mean'")
        return self._head(hidden)

    def _head(self, hidden):
        m = self.module
        if hidden.shape[1] == self.num_patches:
            # patch-stage states: the class token does not exist yet; the model's own readout of patch
            # states is the class-attention stage (forward_cls prepends the class token it computes)
            hidden = m.forward_cls(hidden)
        elif hidden.shape[1] != 1 + self.num_patches:
            raise MethodError(f"timm CaiT layer states of {hidden.shape[1]} tokens: expected {self.num_patches} "
                              f"patches or 1 + {self.num_patches} tokens")
        return m.forward_head(m.norm(hidden))

    # --- capture -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        depth = self.num_patch_layers
        with contextlib.ExitStack() as stack:
            for i, block in enumerate(self.module.blocks):
                stack.enter_context(swapped_forward(block.attn, _talking_heads_forward(block.attn, i, recorder)))
                if recorder.keep_block_outputs:
                    stack.callback(block.register_forward_hook(_patch_block_hook(i, recorder)).remove)
            for j, block in enumerate(self.module.blocks_token_only):
                layer = depth + j
                stack.enter_context(swapped_forward(block.attn, _class_attention_forward(block.attn, layer, recorder)))
                if recorder.keep_block_outputs:
                    hook = block.register_forward_hook(_class_block_hook(layer, recorder), with_kwargs=True)
                    stack.callback(hook.remove)
            # checkpointing would re-run blocks during backward and record twice
            if getattr(self.module, "grad_checkpointing", False):
                stack.enter_context(attribute_set(self.module, "grad_checkpointing", False))
            yield recorder


def embed_patch_attention(attention: torch.Tensor) -> torch.Tensor:
    """(B, K, P, P) -> (B, K, 1 + P, 1 + P): ``[[1, 0], [0, A]]``, built from ``attention`` on the graph."""
    n = attention.shape[-1] + 1
    corner = torch.zeros(n, n, dtype=attention.dtype, device=attention.device)
    corner[0, 0] = 1.0  # the class token (not there yet) keeps itself: identity row and column
    return F.pad(attention, (1, 0, 1, 0)) + corner


def embed_class_row(row: torch.Tensor) -> torch.Tensor:
    """(B, K, 1, N) -> (B, K, N, N): the identity with the class row replaced by ``row`` (on the graph)."""
    b, k, _, n = row.shape
    rest = torch.eye(n, dtype=row.dtype, device=row.device)[1:].expand(b, k, n - 1, n)
    return torch.cat((row, rest), dim=2)  # patch tokens are not updated by class attention: identity rows


def _talking_heads_forward(attn: nn.Module, layer: int, recorder: AttentionRecorder):
    """timm ``TalkingHeadAttn.forward`` (same parameters, same order), the values multiplied by the recorded tensor."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        B, P, C = x.shape
        qkv = attn.qkv(x).reshape(B, P, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
        scores = q @ k.transpose(-2, -1)
        scores = attn.proj_l(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # heads mixed before the softmax
        probs = scores.softmax(dim=-1)
        mixed = attn.proj_w(probs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # ... and after: what multiplies v
        mixed = attn.attn_drop(mixed)
        embedded = recorder.on_probabilities(layer, embed_patch_attention(mixed))
        # the forward reads the recorded tensor, so d(score)/d(recorded) is the attention's gradient
        out = (embedded[:, :, 1:, 1:] @ v).transpose(1, 2).reshape(B, P, C)
        out = attn.proj(out)
        return attn.proj_drop(out)

    return forward


def _class_attention_forward(attn: nn.Module, layer: int, recorder: AttentionRecorder):
    """timm ``ClassAttn.forward`` (its unfused path), the values multiplied by the recorded tensor's class row."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        heads = attn.num_heads
        q = attn.q(x[:, 0]).unsqueeze(1).reshape(B, 1, heads, C // heads).permute(0, 2, 1, 3)
        k = attn.k(x).reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)
        v = attn.v(x).reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)
        row = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        row = attn.attn_drop(row)
        embedded = recorder.on_probabilities(layer, embed_class_row(row))
        x_cls = (embedded[:, :, :1] @ v).transpose(1, 2).reshape(B, 1, C)
        x_cls = attn.proj(x_cls)
        return attn.proj_drop(x_cls)

    return forward


def _patch_block_hook(index: int, recorder: AttentionRecorder):
    def hook(module, inputs, output):
        recorder.on_block_output(index, output)  # (B, P, C): patch tokens only

    return hook


def _class_block_hook(index: int, recorder: AttentionRecorder):
    def hook(module, args, kwargs, output):
        # LayerScaleBlockClassAttn.forward(x, x_cls) returns the new class token; the layer's token
        # states are [cls, patches] with the patches as they entered (class attention leaves them)
        patches = args[0] if args else kwargs["x"]
        recorder.on_block_output(index, torch.cat((output, patches), dim=1))

    return hook


def wrap(module, preprocess=None, class_names=None, info=None) -> TimmCait:
    # timm_preprocess reads the pretrained config and the patch embedding's img_size, as for a timm ViT
    return TimmCait(module, preprocess or timm_preprocess(module), class_names, info)


register_family(Family("timm-cait", "image", is_timm_cait, wrap, priority=16,
                       description="timm CaiT (talking heads, class attention)"))

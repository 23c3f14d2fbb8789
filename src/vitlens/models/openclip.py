"""OpenCLIP models (``open_clip:ARCH[:PRETRAINED]``): the image tower explained for text prompts.

Optional dependency: ``pip install vitlens[openclip]`` (``open-clip-torch``), imported only when an OpenCLIP
spec is loaded or an OpenCLIP module is wrapped. The prompt logic is the one of every CLIP-style adapter
(:class:`vitlens.models.hf_clip.PromptedImageModel`): for prompts t_k,

    e(x)   = visual(x)                                          the image tower's embedding (``encode_image``)
    u_k    = encode_text(tokenize(t_k))
    y_k(x) = exp(logit_scale) * cos(e(x), u_k) (+ logit_bias for SigLIP-style OpenCLIP models)

which is OpenCLIP's own ``logit_scale.exp() * encode_image(x, normalize=True) @ encode_text(t,
normalize=True).T``. One adapter per kind of image tower:

- OpenCLIP's ``VisionTransformer`` (:class:`OpenClip`): ``e(x) = proj^T pool(ln_post(z^L))`` (CLS token for
  ``pool_type='tok'``, patch mean for 'avg'; CoCa pools with an attentional pooler first, whose attention is the
  readout row). The blocks are ``ResidualAttentionBlock``s with an ``nn.MultiheadAttention``, each captured with
  the explicit forward of :mod:`vitlens.models.mha`, swapped onto the instance for the duration of a capture.
  ``_head`` is the tower's own ``_pool`` and ``proj``, so LeGrad's per-layer score is the model's
  (``pool='mean'``: the official LeGrad CLIP score).
- A ``TimmModel`` over a timm token transformer (:class:`OpenClipTimmTower`: OpenCLIP's SigLIP / SigLIP2 and
  EVA-CLIP models): the trunk is read by its own timm adapter, OpenCLIP's projection head follows.
- A convolutional tower (:class:`OpenClipConvTower`: the ResNets ``RN50``..., a ``TimmModel`` over a CNN such as
  ConvNeXt): the Grad-CAM family.

Refused in one line: towers of other kinds, towers without a class token, CoCa's untested 'parallel' / 'cascade'
poolers, patch dropout, and blocks other than ``ResidualAttentionBlock`` (``CustomResidualAttentionBlock``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

from vitlens.errors import ModelError, one_line
from vitlens.models import hub
from vitlens.models.base import ImageModel
from vitlens.models.capture import AttentionRecorder, swapped_forward
from vitlens.models.cnn import CNNModel, timm_fixed_input_size
from vitlens.models.hf_clip import PROMPT_OPTIONS, PromptedImageModel
from vitlens.models.mha import mha_capturing_forward
from vitlens.models.preprocess import Preprocess
from vitlens.models.layers import scan_layers
from vitlens.models.registry import (Family, LoadedModule, NotThisFamily, descriptions, find_family, register_family,
                                     register_spec)
from vitlens.models.weights import HUB_HINT, load_state_dict_checked, read_weights

INSTALL_HINT = "OpenCLIP models need open-clip-torch: pip install vitlens[openclip] (or pip install open-clip-torch)"


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ModelError(INSTALL_HINT) from None
    return open_clip


def is_open_clip(module: nn.Module) -> bool:
    # by defining package, so that no predicate imports open_clip for another model
    return type(module).__module__.startswith("open_clip.") and hasattr(module, "visual") \
        and hasattr(module, "encode_text") and hasattr(module, "logit_scale")


class OpenClipPrompted(PromptedImageModel):
    """What every OpenCLIP adapter shares, whatever its image tower: the prompts through the model's own text tower
    and tokenizer, the image embedding through its own ``encode_image``.

    ``tokenizer``: ``open_clip.get_tokenizer(ARCH)`` (the ``open_clip:`` loader passes it); without one, the
    bundled CLIP BPE tokenizer at the text tower's context length, when the text tower has its vocabulary.
    """

    family = "open-clip"

    def encode_prompts(self, texts):
        """(K, D) u_k = encode_text(tokenize(t_k)) (CoCa normalises it: the cosine does not mind)."""
        if self.tokenizer is None:
            self.tokenizer = self._default_tokenizer()
        tokens = self.tokenizer(texts)
        return self.module.encode_text(tokens.to(self.device))

    def _default_tokenizer(self):
        open_clip = _open_clip()
        text = getattr(self.module, "text", self.module)  # CoCa and CustomTextCLIP keep their text tower apart
        vocab = getattr(self.module, "vocab_size", None) or getattr(text, "vocab_size", None)
        if vocab is None and hasattr(text, "token_embedding"):
            vocab = text.token_embedding.num_embeddings
        if vocab != 49408:
            raise ModelError(f"{self.kind}'s text tower is not CLIP's BPE vocabulary: pass "
                             "tokenizer=open_clip.get_tokenizer(ARCH) to load_model / wrap_module")
        return open_clip.tokenizer.SimpleTokenizer(context_length=int(self.module.context_length))

    def image_embeddings(self, x):
        return self.module.encode_image(x)


class OpenClip(OpenClipPrompted):
    """An OpenCLIP ``CLIP`` / ``CustomTextCLIP`` / ``CoCa`` with OpenCLIP's own ``VisionTransformer`` image tower.

    CoCa's tower pools with an attentional pooler (learnt queries attending over all N tokens, ``attn_pool``) before
    ``ln_post`` and the token / mean pooling of the query outputs. Its rollout-style readout row is that pooler's
    attention, read as for SigLIP: during a capture the pooler runs its ``nn.MultiheadAttention`` with the weights
    returned, and the mean over heads of the query rows the embedding reads (the first for ``pool_type='tok'``, the
    mean of the others for ``'avg'``) is each image's readout.
    """

    def __init__(self, module, preprocess, class_names=None, info=None, **prompt_options):
        super().__init__(module, preprocess, info, **prompt_options)
        visual = module.visual
        self.visual = visual
        if getattr(visual, "attn_pool_contrastive", None) is not None:
            raise ModelError(f"unsupported OpenCLIP attentional pooling {visual.attn_pool_type!r} (marked untested "
                             "in OpenCLIP): vitlens reads CoCa's original pooler")
        if getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
            raise ModelError(f"unsupported OpenCLIP pool_type {visual.pool_type!r}: vitlens reads 'tok' and 'avg'")
        if getattr(visual, "class_embedding", None) is None:
            raise ModelError("unsupported OpenCLIP image tower without a class token")
        if self.attention_pooled and type(visual.attn_pool).forward is not _attentional_pooler().forward:
            raise ModelError(f"unsupported OpenCLIP attentional pooler {type(visual.attn_pool).__name__}: vitlens "
                             "reads open_clip's AttentionalPooler")
        self.layers = list(visual.transformer.resblocks)
        for i, block in enumerate(self.layers):
            if type(block).__name__ != "ResidualAttentionBlock" or not isinstance(block.attn, nn.MultiheadAttention):
                raise ModelError(f"unsupported OpenCLIP block {type(block).__name__} in layer {i}: vitlens reads "
                                 "ResidualAttentionBlock with nn.MultiheadAttention")
        self._set_initial_prompts()

    # --- facts -----------------------------------------------------------------------------------------
    @property
    def attention_pooled(self) -> bool:
        """CoCa: an attentional pooler reads the tokens."""
        return getattr(self.visual, "attn_pool", None) is not None

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def patch_size(self):
        return tuple(self.visual.patch_size)

    def fixed_input_size(self):
        # OpenCLIP's position embedding is one grid's (it does not resample it per call)
        return tuple(self.visual.image_size)

    def readout_weights(self, num_tokens, device=None, dtype=torch.float32):
        weights = torch.zeros(num_tokens, device=device, dtype=dtype)
        if self.attention_pooled:
            # outside a capture (no pooling attention recorded): the mean of all tokens, which the pooler sees
            weights[:] = 1.0 / num_tokens
        elif self.visual.pool_type == "avg":
            weights[1:] = 1.0 / (num_tokens - 1)
        else:
            weights[0] = 1.0
        return weights

    def block_norm_names(self):
        return [self.module_name(block.ln_1) for block in self.layers]

    # --- running it ------------------------------------------------------------------------------------
    def _head(self, hidden):
        """A layer's (B, N, C) tokens through the tower's own pooling (ln_post, CLS or patch mean, CoCa's pooler),
        proj, cosine."""
        pooled, _ = self.visual._pool(hidden)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return self.similarity_logits(pooled)

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        self._require_prompts()
        if getattr(self.visual.transformer, "grad_checkpointing", False):
            raise ModelError("disable gradient checkpointing before explaining an OpenCLIP model")
        if not getattr(self.visual.transformer, "batch_first", True):
            raise ModelError("unsupported OpenCLIP transformer with batch_first=False")
        dropout = getattr(self.visual, "patch_dropout", None)
        if dropout is not None and getattr(dropout, "prob", 0.0) and self.visual.training:
            raise ModelError("patch dropout is on: explain the model in eval mode")
        with contextlib.ExitStack() as stack:
            for i, block in enumerate(self.layers):
                name = f"{self.module_name(block)}.attn"
                stack.enter_context(swapped_forward(block.attn, mha_capturing_forward(block.attn, i, recorder, name)))
                if recorder.keep_block_outputs:
                    stack.callback(block.register_forward_hook(_block_output_hook(recorder)).remove)
            if self.attention_pooled:
                pool = self.visual.attn_pool
                stack.enter_context(swapped_forward(pool, _pooler_forward(pool, self.visual.pool_type, recorder)))
            yield recorder


def _attentional_pooler():
    from open_clip.transformer import AttentionalPooler

    return AttentionalPooler


def _pooler_forward(pool: nn.Module, pool_type: str, recorder: AttentionRecorder):
    """open_clip ``AttentionalPooler.forward`` with the attention weights returned; reports the (B, N) readout.

    The readout is the mean over heads of the query rows the pooled embedding reads: the first query for
    ``pool_type='tok'``, the others for ``'avg'`` (open_clip's ``_global_pool`` of the query outputs).
    """

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = pool.ln_k(x)
        q = pool.ln_q(pool.query)
        out, weights = pool.attn(q.unsqueeze(0).expand(x.shape[0], -1, -1), x, x, need_weights=True,
                                 average_attn_weights=False)  # weights: (B, heads, queries, N)
        read = weights[:, :, :1] if pool_type == "tok" else weights[:, :, 1:]
        recorder.on_readout(read.mean(dim=(1, 2)))
        return out

    return forward


class OpenClipTimmTower(OpenClipPrompted):
    """An OpenCLIP model whose image tower is a ``TimmModel`` over a timm token transformer (OpenCLIP's SigLIP /
    SigLIP2 models over ``vit_*_siglip_*`` with ``global_pool='map'``, EVA-CLIP over ``eva02_*``, ...).

    The tower is ``e(x) = head(trunk(x))``: the trunk is read by its own vitlens adapter (``trunk_model``: timm
    ViT, EVA, BEiT..., which captures its attention, knows its prefix tokens, grid and readout, SigLIP's pooling
    attention included), ``head`` is OpenCLIP's projection after it (empty, linear or MLP). LeGrad's layer score
    is the trunk adapter's own readout of a layer's tokens followed by ``head`` and the cosine.
    """

    def __init__(self, module, preprocess, trunk_model: ImageModel, class_names=None, info=None, **prompt_options):
        super().__init__(module, preprocess, info, **prompt_options)
        self.visual = module.visual
        self.trunk_model = trunk_model
        self.layers = list(range(trunk_model.num_layers))
        self._prefix = self.module_name(self.visual.trunk) + "."
        self._set_initial_prompts()

    def _outer(self, names):
        return [self._prefix + name for name in names]

    # --- facts, from the trunk's adapter -----------------------------------------------------------------
    @property
    def num_prefix_tokens(self) -> int:
        return self.trunk_model.num_prefix_tokens

    @property
    def patch_size(self):
        return self.trunk_model.patch_size

    def grid(self, input_hw):
        return self.trunk_model.grid(input_hw)

    def fixed_input_size(self):
        return self.trunk_model.fixed_input_size()

    def readout_weights(self, num_tokens, device=None, dtype=torch.float32):
        return self.trunk_model.readout_weights(num_tokens, device, dtype)

    def unsupported_methods(self) -> dict:
        return {**self.trunk_model.unsupported_methods(), **super().unsupported_methods()}

    def block_norm_names(self):
        return self._outer(self.trunk_model.block_norm_names())

    def spatial_layer_names(self):
        return self._outer(self.trunk_model.spatial_layer_names())

    def default_cam_layers(self):
        return self._outer(self.trunk_model.default_cam_layers())

    def cam_spatial(self, activation, grid, layer):
        inner = layer[len(self._prefix):] if layer.startswith(self._prefix) else layer
        return self.trunk_model.cam_spatial(activation, grid, inner)

    def prepare(self) -> None:
        self.trunk_model.prepare()

    # --- running it ------------------------------------------------------------------------------------
    def _head(self, hidden):
        """A layer's (B, N, C) tokens through the trunk's final norm, pooling and head, OpenCLIP's head, cosine."""
        return self.similarity_logits(self.visual.head(self.trunk_model._head(hidden)))

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        self._require_prompts()
        with self.trunk_model.capture(recorder):
            yield recorder


class OpenClipConvTower(OpenClipPrompted, CNNModel):
    """An OpenCLIP model with a convolutional image tower: OpenAI's ``ModifiedResNet`` (RN50, RN101, RN50x4...,
    whose attention pooling ``attnpool`` is one attention layer over the last feature map, not a transformer), or
    a ``TimmModel`` over a timm CNN (ConvNeXt CLIP). The Grad-CAM family explains its prompt similarity, on the
    layers a dry run of the image tower finds (default: the last one with a spatial output, ``visual.layer4`` for
    the ResNets); the attention methods are refused as for any CNN.
    """

    has_attention = False

    def __init__(self, module, preprocess, class_names=None, info=None, **prompt_options):
        super().__init__(module, preprocess, info, **prompt_options)
        self.visual = module.visual
        self.layers = []
        self._set_initial_prompts()

    def _dry_run(self) -> None:
        """The image tower's layers and their layouts, named as in the whole model (``visual.layer4``)."""
        h, w = self.preprocess.input_size
        example = torch.zeros(2, 3, h, w, device=self.device, dtype=self.dtype)
        tower = _TowerOnly(self.module_name(self.visual), self.visual)
        with self.eval_mode():
            self._scan = scan_layers(tower, example, second_size=(2 * h, w))

    def fixed_input_size(self):
        if type(self.visual).__name__ == "ModifiedResNet":  # attnpool's position embedding is one grid's
            size = self.visual.image_size
            return (size, size) if isinstance(size, int) else tuple(size)
        return timm_fixed_input_size(self.visual.trunk)

    def logits(self, x):
        self._input_size = tuple(x.shape[-2:])
        return super().logits(x)


class _TowerOnly(nn.Module):
    """Runs only the image tower, registered under its own name, so that a scan names its layers as the model does."""

    def __init__(self, name: str, tower: nn.Module):
        super().__init__()
        self.add_module(name, tower)
        self._name = name

    def forward(self, x):
        return getattr(self, self._name)(x)


def _block_output_hook(recorder: AttentionRecorder):
    def hook(module, inputs, output):
        recorder.on_block_output(len(recorder.block_outputs), output)

    return hook


def openclip_preprocess(module) -> Preprocess:
    """The tower's OpenCLIP preprocessing (``preprocess_cfg``: size, mean, std, interpolation, resize mode)."""
    open_clip = _open_clip()
    cfg = open_clip.get_model_preprocess_cfg(module)
    size = cfg.get("size", module.visual.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    mean = tuple(cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(cfg.get("std") or open_clip.OPENAI_DATASET_STD)
    squash = cfg.get("resize_mode", "shortest") == "squash"
    return Preprocess(input_size=size, mean=mean, std=std, interpolation=cfg.get("interpolation", "bicubic"),
                      crop_pct=1.0, resize_mode="exact" if squash else "shorter")


def load_open_clip_spec(spec, name, weights, num_classes):
    """``open_clip:ARCH[:PRETRAINED]``: ``create_model_and_transforms(ARCH, pretrained=PRETRAINED)`` (hub or
    cache), or the architecture with ``weights`` read safely from a local file."""
    open_clip = _open_clip()
    arch, _, pretrained = name.partition(":")
    if num_classes is not None:
        raise ModelError("--num-classes does not apply to OpenCLIP models: their classes are the prompts")
    if arch not in open_clip.list_models():
        raise ModelError(f"unknown OpenCLIP architecture '{arch}': see open_clip.list_models()")
    if weights is not None and pretrained:
        raise ModelError(f"give '{spec}' without ':{pretrained}' when the weights come from --weights")
    tag = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    if pretrained and not tag:
        raise ModelError(f"unknown OpenCLIP pretrained tag '{pretrained}' for {arch}: see "
                         "open_clip.list_pretrained_tags_by_model(ARCH)")
    if tag and not _cached(tag) and not hub.reachable(hub.HF_HOST):
        raise ModelError(f"cannot fetch '{spec}': the model hub is unreachable and it is not cached; {HUB_HINT}")
    try:  # first: a tokenizer on the hub (SigLIP's, ...) fails fast, before a large model is built
        tokenizer = open_clip.get_tokenizer(arch)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(f"cannot fetch the tokenizer of '{spec}' (the model hub failed: {one_line(exc)}): load it "
                         "once with internet access (it stays in the Hugging Face cache), or build the model in Python "
                         "and pass tokenizer= to vitlens.wrap_module") from None
    try:
        if weights is not None:
            with _without_root_warnings():  # "No pretrained weights loaded ... initialized randomly": they are next
                module = open_clip.create_model(arch, pretrained=None)
            load_state_dict_checked(module, read_weights(weights), weights, spec)
        else:
            with hub.quiet_progress():
                module, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
    except ModelError:
        raise
    except (RuntimeError, OSError) as exc:
        raise ModelError(f"cannot fetch '{spec}' (the model hub failed: {one_line(exc)}): {HUB_HINT}") from None
    return LoadedModule(module.eval(), tokenizer=tokenizer)


@contextlib.contextmanager
def _without_root_warnings() -> Iterator[None]:
    """OpenCLIP warns on the root logger when it builds an architecture without weights; vitlens loads them next."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _cached(tag: dict) -> bool:
    """Are a pretrained tag's weights in the local Hugging Face cache (so that loading needs no network)?"""
    repo = (tag.get("hf_hub") or "").strip("/")
    if not repo:
        return False
    from huggingface_hub import try_to_load_from_cache

    names = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)


def wrap(module, preprocess=None, class_names=None, info=None, *, prompts=None, classes=None, template=None,
         tokenizer=None) -> OpenClipPrompted:
    if not is_open_clip(module):  # prompts given for another model: the next prompted family may read it
        raise NotThisFamily(f"prompts are for CLIP-style models (Hugging Face CLIPModel, SiglipModel, OpenCLIP): "
                            f"{type(module).__name__} is not one")
    tower = type(module.visual).__name__
    if tower not in ("VisionTransformer", "ModifiedResNet", "TimmModel"):
        raise ModelError(f"unsupported OpenCLIP image tower {tower}: vitlens reads VisionTransformer, ModifiedResNet "
                         "and TimmModel towers")
    preprocess = preprocess or openclip_preprocess(module)
    options = dict(prompts=prompts, classes=classes, template=template, tokenizer=tokenizer)
    if tower == "VisionTransformer":
        return OpenClip(module, preprocess, class_names, info, **options)
    if tower == "TimmModel":  # its trunk is read by its own family: attention families come before the CNN catch-all
        trunk = module.visual.trunk
        family = find_family(trunk, "image")
        if family is None:
            raise ModelError(f"unsupported timm trunk {type(trunk).__name__} in the OpenCLIP image tower: vitlens "
                             f"reads {descriptions('image')}")
        trunk_model = family.wrap(trunk, preprocess)
        if trunk_model.has_attention:
            return OpenClipTimmTower(module, preprocess, trunk_model, class_names, info, **options)
    # a ModifiedResNet, or a TimmModel over a CNN
    return OpenClipConvTower(module, preprocess, class_names, info, **options)


register_family(Family("open-clip", "image", is_open_clip, wrap, priority=18, options=PROMPT_OPTIONS,
                       description="OpenCLIP models (ViT, timm and ResNet towers, CoCa; with text prompts)"))
register_spec("image", "open_clip", load_open_clip_spec)

"""OpenCLIP models (``open_clip:ARCH[:PRETRAINED]``): the ViT image tower explained for text prompts.

Optional dependency: ``pip install vitlens[openclip]`` (``open-clip-torch``), imported only when an OpenCLIP
spec is loaded or an OpenCLIP module is wrapped. The prompt logic is the one of every CLIP-style adapter
(:class:`vitlens.models.hf_clip.PromptedImageModel`): for prompts t_k,

    e(x)   = visual(x) = proj^T pool(ln_post(z^L))            (CLS token for ``pool_type='tok'``, patch mean for 'avg')
    u_k    = encode_text(tokenize(t_k))
    y_k(x) = exp(logit_scale) * cos(e(x), u_k) (+ logit_bias for SigLIP-style OpenCLIP models)

which is OpenCLIP's own ``logit_scale.exp() * encode_image(x, normalize=True) @ encode_text(t,
normalize=True).T``. The image tower's blocks are ``ResidualAttentionBlock``s with an
``nn.MultiheadAttention``: each is captured with the explicit forward of :mod:`vitlens.models.mha`, swapped
onto the instance for the duration of a capture. ``_head`` is the tower's own ``_pool`` and ``proj``, so
LeGrad's per-layer score is the model's (``pool='mean'``: the official LeGrad CLIP score). Refused in one
line: ResNet or timm image towers, attentional poolers (CoCa), towers without a class token, patch
dropout, and blocks other than ``ResidualAttentionBlock`` (``CustomResidualAttentionBlock``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from vitlens.errors import ModelError, one_line
from vitlens.models import hub
from vitlens.models.capture import AttentionRecorder, swapped_forward
from vitlens.models.hf_clip import PROMPT_OPTIONS, PromptedImageModel
from vitlens.models.mha import mha_capturing_forward
from vitlens.models.preprocess import Preprocess
from vitlens.models.registry import Family, LoadedModule, NotThisFamily, register_family, register_spec
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


class OpenClip(PromptedImageModel):
    """An OpenCLIP ``CLIP`` / ``CustomTextCLIP`` with a ``VisionTransformer`` image tower.

    ``tokenizer``: ``open_clip.get_tokenizer(ARCH)`` (the ``open_clip:`` loader passes it); without one, the
    bundled CLIP BPE tokenizer at the text tower's context length, when the text tower has its vocabulary.
    """

    family = "open-clip"

    def __init__(self, module, preprocess, class_names=None, info=None, **prompt_options):
        super().__init__(module, preprocess, info, **prompt_options)
        visual = module.visual
        self.visual = visual
        if type(visual).__name__ != "VisionTransformer":
            raise ModelError(f"unsupported OpenCLIP image tower {type(visual).__name__}: vitlens reads OpenCLIP's "
                             "VisionTransformer (ResNet and timm towers: not yet)")
        if getattr(visual, "attn_pool", None) is not None:
            raise ModelError("unsupported OpenCLIP image tower with an attentional pooler (CoCa): not yet")
        if getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
            raise ModelError(f"unsupported OpenCLIP pool_type {visual.pool_type!r}: vitlens reads 'tok' and 'avg'")
        if getattr(visual, "class_embedding", None) is None:
            raise ModelError("unsupported OpenCLIP image tower without a class token")
        self.layers = list(visual.transformer.resblocks)
        for i, block in enumerate(self.layers):
            if type(block).__name__ != "ResidualAttentionBlock" or not isinstance(block.attn, nn.MultiheadAttention):
                raise ModelError(f"unsupported OpenCLIP block {type(block).__name__} in layer {i}: vitlens reads "
                                 "ResidualAttentionBlock with nn.MultiheadAttention")
        self._set_initial_prompts()

    # --- prompts ---------------------------------------------------------------------------------------
    def encode_prompts(self, texts):
        """(K, D) u_k = encode_text(tokenize(t_k)), not normalised."""
        if self.tokenizer is None:
            self.tokenizer = self._default_tokenizer()
        tokens = self.tokenizer(texts)
        return self.module.encode_text(tokens.to(self.device))

    def _default_tokenizer(self):
        open_clip = _open_clip()
        vocab = getattr(self.module, "vocab_size", None)
        if vocab is None and hasattr(self.module, "token_embedding"):
            vocab = self.module.token_embedding.num_embeddings
        if vocab != 49408:
            raise ModelError(f"{self.kind}'s text tower is not CLIP's BPE vocabulary: pass "
                             "tokenizer=open_clip.get_tokenizer(ARCH) to load_model / wrap_module")
        return open_clip.tokenizer.SimpleTokenizer(context_length=int(self.module.context_length))

    # --- facts -----------------------------------------------------------------------------------------
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
        if self.visual.pool_type == "avg":
            weights[1:] = 1.0 / (num_tokens - 1)
        else:
            weights[0] = 1.0
        return weights

    def block_norm_names(self):
        return [self.module_name(block.ln_1) for block in self.layers]

    # --- running it ------------------------------------------------------------------------------------
    def image_embeddings(self, x):
        return self.module.encode_image(x)

    def _head(self, hidden):
        """A layer's (B, N, C) tokens through the tower's own pooling (ln_post, CLS or patch mean), proj, cosine."""
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
            yield recorder


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
    try:
        if weights is not None:
            module = open_clip.create_model(arch, pretrained=None)
            load_state_dict_checked(module, read_weights(weights), weights, spec)
        else:
            with hub.quiet_progress():
                module, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
    except ModelError:
        raise
    except (RuntimeError, OSError) as exc:
        raise ModelError(f"cannot fetch '{spec}' (the model hub failed: {one_line(exc)}): {HUB_HINT}") from None
    return LoadedModule(module.eval(), tokenizer=open_clip.get_tokenizer(arch))


def _cached(tag: dict) -> bool:
    """Are a pretrained tag's weights in the local Hugging Face cache (so that loading needs no network)?"""
    repo = (tag.get("hf_hub") or "").strip("/")
    if not repo:
        return False
    from huggingface_hub import try_to_load_from_cache

    names = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)


def wrap(module, preprocess=None, class_names=None, info=None, *, prompts=None, classes=None, template=None,
         tokenizer=None) -> OpenClip:
    if not is_open_clip(module):  # prompts given for another model: the next prompted family may read it
        raise NotThisFamily(f"prompts are for CLIP-style models (Hugging Face CLIPModel, SiglipModel, OpenCLIP): "
                            f"{type(module).__name__} is not one")
    return OpenClip(module, preprocess or openclip_preprocess(module), class_names, info, prompts=prompts,
                    classes=classes, template=template, tokenizer=tokenizer)


register_family(Family("open-clip", "image", is_open_clip, wrap, priority=18, options=PROMPT_OPTIONS,
                       description="OpenCLIP ViT models (with text prompts)"))
register_spec("image", "open_clip", load_open_clip_spec)

"""Hugging Face ``CLIPModel`` and ``SiglipModel``: the image tower explained for text prompts (zero-shot too).

A CLIP model has no classifier; its "classes" are text prompts. For prompts t_1..t_K the adapter's logits
are the model's own ``logits_per_image``:

    e(x)   = visual_projection(post_layernorm(z^L_CLS))           image embedding (the vision tower's CLS)
    u_k    = text_projection(text_model(t_k).pooler_output)        prompt embedding, computed once per prompt
    y_k(x) = exp(logit_scale) * <e(x) / ||e(x)||, u_k / ||u_k||>    cosine similarity, scaled

The prompts are set with ``load_model(module_or_spec, prompts=[...])`` / ``wrap_module(module, prompts=...)``
or :meth:`HFClip.set_prompts`; zero-shot class names go through a template instead
(``classes=['dog', 'cat'], template='a photo of a {}.'`` gives the prompts 'a photo of a dog.', ... and the
class names 'dog', 'cat'). The text tower runs once per :meth:`~HFClip.set_prompts`, outside every capture,
so only the image tower's attention is recorded.

Attention is captured through the shared Hugging Face mechanism (:mod:`vitlens.models.hf_capture`). The
readout is the CLS row (the vision tower pools its CLS token). LeGrad's per-layer score ``layer_logits``
runs a layer's tokens through the same ``post_layernorm``, ``visual_projection`` and cosine: with
``pool='mean'`` the token mean, which is the official LeGrad code for CLIP (its score is the cosine
without ``exp(logit_scale)``, a positive constant that the ReLU and the min-max of the map ignore).
AttnLRP / CP-LRP are refused: the L2 normalisation of the image embedding in the cosine has no
relevance rule.

SigLIP (:class:`HFSiglip`) differs in three places. Its logits add a learnt bias,
``y_k = exp(logit_scale) * cos(e(x), u_k) + logit_bias`` (``u_k`` is the text tower's pooled output, no
projection). Its image tower has no CLS token: ``e(x) = head(post_layernorm(z^L))``, where ``head`` is an
attention-pooling block, a learnt probe query q attending over all N patch tokens
(``a = mean_heads softmax(q K^T / sqrt(d))``, then out_proj, layernorm + MLP residual). So the rollout-style
readout row is that pooling attention of the image, ``w = a`` (B, N), captured from the head's own
``nn.MultiheadAttention`` weights in the same forward, not a CLS row. And LeGrad's ``pool='model'`` re-applies
the attention pooler to a layer's tokens, which is the official LeGrad SigLIP code (without its empty-prompt
correction).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from vitlens.errors import MethodError, ModelError, TargetError
from vitlens.models.base import ImageModel
from vitlens.models.capture import AttentionRecorder
from vitlens.models.hf_capture import hf_capture
from vitlens.models.preprocess import hf_preprocess_from_config
from vitlens.models.registry import Family, NotThisFamily, register_family

SUPPORTED = ("CLIPModel", "SiglipModel")
#: the options only the CLIP-style families read (any of them selects one of those families)
PROMPT_OPTIONS = frozenset({"prompts", "classes", "template", "tokenizer"})
#: what an attention layer must have for its call to go through AttentionInterface as read here
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj", "config")
LRP_REASON = ("the cosine similarity of a CLIP-style model L2-normalises the image embedding, which no LRP rule "
              "covers: use the attention methods or Grad-CAM")
DEFAULT_TEMPLATE = "a photo of a {}."


def is_hf_clip(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ in SUPPORTED and cls.__module__.startswith("transformers.") and hasattr(module, "config")


def prompts_from(prompts=None, classes=None, template=None) -> tuple[list[str], list[str]]:
    """(prompts, class names) from either prompts or zero-shot class names filled into a template.

    ``prompts``: the class names are the prompts. ``classes`` (a list, or one comma-separated string):
    prompt_k = ``template.format(class_k)`` (default template 'a photo of a {}.'), class name_k = class_k.
    """
    if prompts is not None and classes is not None:
        raise ModelError("give prompts or zero-shot classes (with a template), not both")
    if template is not None and classes is None:
        raise ModelError("a prompt template needs zero-shot classes to fill in (classes=[...])")
    if classes is not None:
        names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else [str(c) for c in classes]
        template = DEFAULT_TEMPLATE if template is None else str(template)
        if "{}" not in template:
            raise ModelError(f"prompt template {template!r} has no '{{}}' for the class name")
        if not names or any(not n for n in names):
            raise ModelError("zero-shot classes must be non-empty names")
        return [template.replace("{}", n) for n in names], names
    if prompts is None:
        return [], []
    items = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    if not items or any(not p.strip() for p in items):
        raise ModelError("prompts must be non-empty texts")
    return items, items


class PromptedImageModel(ImageModel):
    """What every CLIP-style adapter shares: prompts as classes, their text embeddings, the cosine logits.

    Subclasses say how prompts become text embeddings (:meth:`encode_prompts`) and the image tower's
    embedding (:meth:`image_embeddings`, :meth:`_head`); the logits are
    ``exp(logit_scale) * cos(image embedding, prompt embedding) (+ logit_bias when the model has one)``.
    """

    def __init__(self, module, preprocess, info=None, *, prompts=None, classes=None, template=None,
                 tokenizer=None):
        super().__init__(module, preprocess, None, info)
        self.kind = type(module).__name__
        self.tokenizer = tokenizer
        self.prompts: list[str] = []
        self.prompt_embeddings: torch.Tensor | None = None
        self._initial_prompts = prompts_from(prompts, classes, template)

    @property
    def num_layers(self) -> int:
        """The image tower's blocks (``self.layers``, set by each subclass)."""
        return len(self.layers)

    def _set_initial_prompts(self) -> None:
        """Encode the prompts given at construction (called by subclasses once their parts are known)."""
        texts, names = self._initial_prompts
        if texts:
            self._set(texts, names)

    # --- prompts ---------------------------------------------------------------------------------
    def set_prompts(self, prompts=None, *, classes=None, template=None) -> "PromptedImageModel":
        """Explain similarity to these prompts from now on (or zero-shot ``classes`` filled into ``template``)."""
        texts, names = prompts_from(prompts, classes, template)
        if not texts:
            raise ModelError("set_prompts needs prompts or zero-shot classes")
        self._set(texts, names)
        return self

    def _set(self, texts: list[str], names: list[str]) -> None:
        with torch.no_grad(), self.eval_mode():
            embeddings = self.encode_prompts(texts)
        self.prompts = list(texts)
        self.class_names = list(names)
        self.prompt_embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)

    def encode_prompts(self, texts: list[str]) -> torch.Tensor:
        """(K, D) text embeddings of the prompts (not normalised)."""
        raise NotImplementedError

    def _require_prompts(self) -> torch.Tensor:
        if self.prompt_embeddings is None:
            raise TargetError(f"{self.kind} is explained for text prompts and has none: load_model(..., prompts=[...]) "
                              "or model.set_prompts([...])")
        return self.prompt_embeddings

    @property
    def num_classes(self) -> int:
        return len(self.prompts) if self.prompt_embeddings is not None else 0

    def unsupported_methods(self) -> dict:
        return {"attnlrp": LRP_REASON, "cp-lrp": LRP_REASON}

    def similarity_logits(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """y = exp(logit_scale) * cos(image embedding, prompt embedding) (+ logit_bias), (B, K)."""
        prompts = self._require_prompts().to(image_embeddings.device, image_embeddings.dtype)
        image = image_embeddings / image_embeddings.norm(dim=-1, keepdim=True)
        logits = self.module.logit_scale.exp() * image @ prompts.T
        bias = getattr(self.module, "logit_bias", None)
        return logits if bias is None else logits + bias

    def image_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) the image tower's embedding."""
        raise NotImplementedError

    def logits(self, x):
        self._require_prompts()
        return self.similarity_logits(self.image_embeddings(x))

    def layer_logits(self, hidden, pool="model"):
        if pool not in ("model", "mean"):
            raise MethodError(f"unknown pool {pool!r}: expected 'model' or 'mean'")
        return super().layer_logits(hidden, pool)


class HFClip(PromptedImageModel):
    """Hugging Face ``CLIPModel``: the vision tower's similarity to text prompts as class logits.

    Parameters
    ----------
    module : CLIPModel
    preprocess : Preprocess
    prompts, classes, template : see :func:`prompts_from`
    tokenizer : callable, optional
        ``tokenizer(texts, padding=True, truncation=True, return_tensors='pt')`` giving ``input_ids`` and
        ``attention_mask``; default: the model directory's own tokenizer (``AutoTokenizer``, local files).
    """

    family = "hf-clip"
    #: how the prompts are padded (SigLIP was trained on prompts padded to the tokenizer's maximum length)
    padding: bool | str = True

    def __init__(self, module, preprocess, class_names=None, info=None, **prompt_options):
        super().__init__(module, preprocess, info, **prompt_options)
        self.vision = module.vision_model
        self.layers = self.vision.encoder.layers
        for i, layer in enumerate(self.layers):
            attention = getattr(layer, "self_attn", None)
            if not all(hasattr(attention, p) for p in ATTENTION_PARTS):
                raise ModelError(f"unsupported attention {type(attention).__name__} in layer {i} of {self.kind}: "
                                 "vitlens reads transformers' attention with q_proj, k_proj, v_proj, out_proj "
                                 "through AttentionInterface")
        self._set_initial_prompts()

    def _tokenize(self, texts: list[str]) -> dict:
        if self.tokenizer is None:
            self.tokenizer = self._own_tokenizer()
        tokens = self.tokenizer(texts, padding=self.padding, truncation=True, return_tensors="pt")
        return {k: tokens[k].to(self.device) for k in ("input_ids", "attention_mask") if k in tokens}

    def _own_tokenizer(self):
        where = getattr(self.module.config, "_name_or_path", "") or ""
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(where, local_files_only=True)
        except Exception:
            raise ModelError(f"{self.kind} has no tokenizer saved with it ({where or 'built in memory'}): "
                             "pass tokenizer= to load_model / wrap_module") from None

    def encode_prompts(self, texts: list[str]) -> torch.Tensor:
        """(K, D) text embeddings u_k = text_projection(pooled text tower output), not normalised."""
        features = self.module.get_text_features(**self._tokenize(texts))
        return getattr(features, "pooler_output", features)

    # --- facts -------------------------------------------------------------------------------------
    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def patch_size(self):
        p = self.vision.config.patch_size
        return (p, p) if isinstance(p, int) else tuple(p)

    def _image_size(self):
        s = self.vision.config.image_size
        return (s, s) if isinstance(s, int) else tuple(s)

    def block_norm_names(self):
        return [self.module_name(layer.layer_norm1) for layer in self.layers]

    # --- running it --------------------------------------------------------------------------------
    def image_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) e(x) = visual_projection(post_layernorm(CLS)), the model's own modules in its order."""
        interpolate = tuple(x.shape[-2:]) != self._image_size()
        pooled = self.vision(pixel_values=x, interpolate_pos_encoding=interpolate).pooler_output
        return self.module.visual_projection(pooled)

    def _head(self, hidden):
        """A layer's (B, N, C) tokens read as the model reads its last: CLS, post_layernorm, projection, cosine."""
        return self.similarity_logits(self.module.visual_projection(self.vision.post_layernorm(hidden[:, 0])))

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        self._require_prompts()
        with hf_capture(self.module, recorder, self.layers):
            yield recorder


class HFSiglip(HFClip):
    """Hugging Face ``SiglipModel``: no CLS token, an attention-pooling head, a logit bias (see the module doc)."""

    family = "hf-siglip"
    padding = "max_length"

    def __init__(self, module, preprocess, class_names=None, info=None, **prompt_options):
        if not getattr(module.vision_model, "use_head", False):
            raise ModelError("SigLIP vision towers without the attention-pooling head (vision_use_head=False) have "
                             "no image embedding to compare with prompts")
        super().__init__(module, preprocess, class_names, info, **prompt_options)

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    def readout_weights(self, num_tokens, device=None, dtype=torch.float32):
        """Outside a capture (no pooling attention recorded): the mean of all tokens."""
        return torch.full((num_tokens,), 1.0 / num_tokens, device=device, dtype=dtype)

    def image_embeddings(self, x):
        """(B, D) e(x) = head(post_layernorm(z^L)), the attention-pooled image embedding."""
        interpolate = tuple(x.shape[-2:]) != self._image_size()
        return self.vision(pixel_values=x, interpolate_pos_encoding=interpolate).pooler_output

    def _head(self, hidden):
        """A layer's (B, N, C) tokens through post_layernorm, the attention-pooling head and the cosine."""
        return self.similarity_logits(self.vision.head(self.vision.post_layernorm(hidden)))

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        pooling = self.vision.head.attention

        def report_pooling_weights(module, inputs, output):
            # nn.MultiheadAttention returns the probe's weights averaged over heads, (B, 1, N)
            if output[1] is not None:
                recorder.on_readout(output[1][:, 0])

        with super().capture(recorder), contextlib.ExitStack() as stack:
            stack.callback(pooling.register_forward_hook(report_pooling_weights).remove)
            yield recorder


def wrap(module, preprocess=None, class_names=None, info=None, *, prompts=None, classes=None, template=None,
         tokenizer=None) -> HFClip:
    if not is_hf_clip(module):  # prompts given for another model: the next prompted family may read it
        raise NotThisFamily(f"prompts are for CLIP-style models (Hugging Face CLIPModel, SiglipModel, OpenCLIP): "
                         f"{type(module).__name__} is not one")
    preprocess = preprocess or hf_preprocess_from_config(module.config.vision_config,
                                                         getattr(module.config, "_name_or_path", None) or None)
    adapter = HFSiglip if type(module).__name__ == "SiglipModel" else HFClip
    return adapter(module, preprocess, class_names, info, prompts=prompts, classes=classes, template=template,
                   tokenizer=tokenizer)


# before the classifier families: a CLIPModel is read as a CLIP model, never as a generic one
register_family(Family("hf-clip", "image", is_hf_clip, wrap, priority=18, options=PROMPT_OPTIONS,
                       description="Hugging Face CLIPModel and SiglipModel (with text prompts)"))

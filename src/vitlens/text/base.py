"""What every text adapter shares: a Hugging Face text transformer, its tokenizer and its blocks.

Subclasses: :class:`vitlens.text.encoders.EncoderModel` (BERT-like encoders and sequence classifiers)
and :class:`vitlens.text.decoders.DecoderModel` (causal language models explaining one next token).

Capture is the shared Hugging Face mechanism (:mod:`vitlens.models.hf_capture`), the one the image
adapter uses. The forward always starts from ``inputs_embeds`` (the word embeddings of the ids, a
detached leaf): gradients exist even when the user froze every parameter, and a modified-backward
method (AttnLRP: relevance = embeddings x gradient, summed over channels) has the input it needs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from vitlens.errors import InputError, MethodError
from vitlens.models.base import ExplainableModel, ModelInfo
from vitlens.models.capture import AttentionRecorder
from vitlens.models.hf_capture import hf_capture
from vitlens.models.registry import descriptions
from vitlens.text.batch import TextBatch


def unsupported_message(name: str) -> str:
    """One line naming a module class vitlens cannot read and every registered text family."""
    return f"unsupported text model {name}: vitlens reads {descriptions('text')}"


class TextModel(ExplainableModel):
    """Base class of the text adapters.

    Parameters
    ----------
    module : nn.Module
        A Hugging Face model of a family the subclass reads.
    tokenizer : transformers tokenizer, optional
        Needed to explain strings (ids can always be given directly).
    text_family : str
        The architecture family (``'bert'``, ``'gpt2'``...), for the few places that differ.
    backbone : nn.Module
        The base model inside a classifier / LM head (the module itself for a plain encoder).
    layers : list of nn.Module
        The blocks, in forward order (their outputs are the residual stream LeGrad reads).
    is_classifier : bool
        True when the model has classes to explain (sequence classifiers; a decoder's vocabulary).
    """

    family = "hf-text"
    has_attention = True
    #: causal language models explain the next token at the last real position
    is_causal = False

    def __init__(self, module: nn.Module, tokenizer, *, text_family: str, backbone: nn.Module, layers: list,
                 is_classifier: bool, class_names: Sequence[str] | None = None, info: ModelInfo | None = None):
        name = type(module).__name__
        super().__init__(module, class_names, info or ModelInfo(spec=f"module:{name}"))
        self.tokenizer = tokenizer
        self.kind_name = name
        self.text_family = text_family
        self.backbone = backbone
        self.layers = list(layers)
        self.is_classifier = is_classifier

    # --- facts ------------------------------------------------------------------------------
    @property
    def config(self):
        return self.module.config

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    def _position_limit(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 512))

    @property
    def max_length(self) -> int:
        """The longest input the model takes, in tokens (special tokens included)."""
        limit = self._position_limit()
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < limit:
            limit = tok_max
        return limit

    def describe(self) -> dict:
        raise NotImplementedError

    # --- running it -------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, truncate: bool = False,
               max_length: int | None = None) -> TextBatch:
        """Tokenize texts into a padded :class:`TextBatch` on the model's device."""
        raise NotImplementedError

    def checked_texts(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                      single: str | None = None) -> list[str]:
        """The texts (and second texts) to tokenize, checked in one place: one-line ``InputError``s for no
        tokenizer, no text, a text that is not a string or is empty, and pairs given to a model that reads
        one text (``single`` says what such a model reads, e.g. ``'a causal decoder reads one text'``)."""
        if self.tokenizer is None:
            raise InputError("this text model has no tokenizer: pass tokenizer= to load_text_model, or token ids")
        if pairs is not None and single is not None:
            raise InputError(f"{single}: --pair / pairs= are for encoders")
        texts = list(texts)
        if not texts:
            raise InputError("no text given")
        for i, text in enumerate(texts + list(pairs or [])):
            if not isinstance(text, str):
                raise InputError(f"text {i + 1} is a {type(text).__name__}, not a string")
            if not text.strip():
                raise InputError("empty text: give at least one word to explain")
        return texts

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings of the ids as a detached leaf (B, N, E): the input of :meth:`forward`."""
        with torch.no_grad():
            return self.module.get_input_embeddings()(input_ids).detach()

    def forward(self, batch: TextBatch, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (S, classes) of a classifier, or the last hidden states (S, N, C) of a plain encoder."""
        raise NotImplementedError

    def logits(self, batch: TextBatch) -> torch.Tensor:
        return self.forward(batch)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(S, C) the token state(s) the explained score reads, from token states (S, N, C)."""
        raise NotImplementedError

    def layer_scores(self, hidden: torch.Tensor, attention_mask: torch.Tensor, pool: str = "model") -> torch.Tensor:
        """Class scores read out of a block's output with the model's own head (LeGrad)."""
        raise NotImplementedError

    @staticmethod
    def pool_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the real tokens' states (S, C), padding excluded."""
        weights = attention_mask.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        """Within the block, every attention layer reports its probabilities to ``recorder``."""
        with hf_capture(self.module, recorder, self.layers):
            yield recorder


def check_pool(pool: str) -> None:
    if pool not in ("model", "mean"):
        raise MethodError(f"unknown pool {pool!r}: expected 'model' or 'mean'")


__all__ = ["TextModel", "check_pool", "unsupported_message"]

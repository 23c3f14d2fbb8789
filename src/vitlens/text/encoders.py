"""Adapters for Hugging Face text encoders: BERT, RoBERTa (XLM-R, CamemBERT), DistilBERT, ALBERT, ELECTRA, and the
encoder of T5 / mT5 (``T5EncoderModel``, ``MT5EncoderModel``: sentence embeddings by mean pooling, T5 has no CLS
token; its relative position bias reaches the shared capture as the attention bias, and a block's output is read
through the final RMS norm, as the last hidden state is).

Both the plain encoder (``BertModel``, the sentence-transformers MiniLM, ...) and the
``...ForSequenceClassification`` form are supported. Capture, the word-embedding leaf and the
padding masks are the text base class's (:mod:`vitlens.text.base`); this file knows where each
family keeps its blocks and head, how it numbers positions and how a plain encoder pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from vitlens.errors import InputError, MethodError, ModelError, TargetError
from vitlens.models.base import ModelInfo
from vitlens.models.registry import Family, register_family
from vitlens.text.base import TextModel, unsupported_message
from vitlens.text.batch import TextBatch

#: model class name -> (family, attribute of the base model inside a classifier)
FAMILIES = {
    "BertModel": ("bert", None),
    "BertForSequenceClassification": ("bert", "bert"),
    "RobertaModel": ("roberta", None),
    "RobertaForSequenceClassification": ("roberta", "roberta"),
    "XLMRobertaModel": ("roberta", None),
    "XLMRobertaForSequenceClassification": ("roberta", "roberta"),
    "CamembertModel": ("roberta", None),
    "CamembertForSequenceClassification": ("roberta", "roberta"),
    "DistilBertModel": ("distilbert", None),
    "DistilBertForSequenceClassification": ("distilbert", "distilbert"),
    "AlbertModel": ("albert", None),
    "AlbertForSequenceClassification": ("albert", "albert"),
    "ElectraModel": ("electra", None),
    "ElectraForSequenceClassification": ("electra", "electra"),
    "T5EncoderModel": ("t5", None),
    "MT5EncoderModel": ("t5", None),
}


def _bert_head(m, backbone, hidden):
    return m.classifier(m.dropout(backbone.pooler(hidden)))


def _token_head(m, backbone, hidden):  # RoBERTa / ELECTRA heads read the first token themselves
    return m.classifier(hidden)


def _distilbert_head(m, backbone, hidden):
    return m.classifier(m.dropout(torch.relu(m.pre_classifier(hidden[:, 0]))))


def _albert_head(m, backbone, hidden):
    return m.classifier(m.dropout(backbone.pooler_activation(backbone.pooler(hidden[:, 0]))))


def _no_head(m, backbone, hidden):  # plain encoders only (T5EncoderModel)
    raise TargetError(f"{type(m).__name__} is a plain encoder without a classification head")


def _encoder_layers(backbone):
    return list(backbone.encoder.layer)


def _albert_layers(backbone):
    return [layer for group in backbone.encoder.albert_layer_groups for layer in group.albert_layers]


@dataclass(frozen=True)
class EncoderArchitecture:
    """What differs between the encoder architectures this adapter reads.

    Attributes
    ----------
    layers : callable
        backbone -> its blocks, in forward order.
    head : callable
        (classifier module, backbone, token states (B, N, C)) -> logits: the classifier's own head,
        applied to any layer's states (LeGrad).
    token_types : bool
        Whether the model takes segment ids.
    positions_from_ids : bool
        RoBERTa numbers positions from the ids, after the padding index: from embeddings alone it
        cannot, so the adapter passes them, and the longest input is shorter by that offset.
    layer_calls : callable or None
        config -> attention layers run per forward when blocks are shared (ALBERT), else None.
    final_norm : callable or None
        backbone -> the norm applied after the last block (T5's RMS norm), which a block's output passes
        through before it is pooled (LeGrad reads every block as the last one would be read), else None.
    has_cls : bool
        Whether the first token is a classifier token ([CLS] / <s>) that 'cls' pooling can read (not T5).
    """

    layers: Callable
    head: Callable
    token_types: bool = True
    positions_from_ids: bool = False
    layer_calls: Callable | None = None
    final_norm: Callable | None = None
    has_cls: bool = True


ARCHITECTURES = {
    "bert": EncoderArchitecture(_encoder_layers, _bert_head),
    "roberta": EncoderArchitecture(_encoder_layers, _token_head, positions_from_ids=True),
    "electra": EncoderArchitecture(_encoder_layers, _token_head),
    "distilbert": EncoderArchitecture(lambda backbone: list(backbone.transformer.layer), _distilbert_head,
                                      token_types=False),
    "albert": EncoderArchitecture(_albert_layers, _albert_head,
                                  layer_calls=lambda cfg: int(cfg.num_hidden_layers) * int(cfg.inner_group_num)),
    "t5": EncoderArchitecture(lambda backbone: list(backbone.encoder.block), _no_head, token_types=False,
                              final_norm=lambda backbone: backbone.encoder.final_layer_norm, has_cls=False),
}
SUPPORTED_FAMILIES = ("BERT (incl. MiniLM), RoBERTa, XLM-RoBERTa, CamemBERT, DistilBERT, ALBERT, ELECTRA, "
                      "T5 / mT5 encoders (T5EncoderModel)")
PACKAGED_MINILM = ("vitlens:all-minilm-l6-v2", "vitlens:minilm", "minilm")
POOLINGS = ("mean", "cls")


class EncoderModel(TextModel):
    """A Hugging Face text encoder or sequence classifier, with its tokenizer.

    Parameters
    ----------
    module : nn.Module
        One of the classes in :data:`FAMILIES`.
    tokenizer : transformers tokenizer, optional
        Needed to explain strings (ids can always be given directly).
    pooling : {'mean', 'cls'}
        How a plain encoder turns token states into a sentence embedding (for the scalar that is
        explained, e.g. a cosine similarity). Read from a sentence-transformers directory when
        there is one; mean pooling over real tokens otherwise.
    """

    def __init__(self, module: nn.Module, tokenizer=None, pooling: str = "mean", class_names=None,
                 info: ModelInfo | None = None):
        name = type(module).__name__
        if name not in FAMILIES:
            raise ModelError(unsupported_message(name))
        if pooling not in POOLINGS:
            raise ModelError(f"unknown pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        if class_names is None and name.endswith("ForSequenceClassification"):
            id2label = getattr(module.config, "id2label", None) or {}
            class_names = [str(id2label.get(i, f"LABEL_{i}")) for i in range(module.config.num_labels)]
        text_family, base_attr = FAMILIES[name]
        backbone = getattr(module, base_attr) if base_attr else module
        self.architecture = ARCHITECTURES[text_family]
        if pooling == "cls" and not self.architecture.has_cls:
            raise ModelError(f"{name} has no CLS token: use mean pooling")
        super().__init__(module, tokenizer, text_family=text_family, backbone=backbone,
                         layers=self.architecture.layers(backbone), is_classifier=base_attr is not None,
                         class_names=class_names, info=info)
        self.pooling = pooling

    @property
    def num_layers(self) -> int:
        """Attention layers run per forward (ALBERT runs its shared layers several times)."""
        calls = self.architecture.layer_calls
        return calls(self.config) if calls is not None else len(self.layers)

    @property
    def num_classes(self) -> int:
        if not self.is_classifier:
            raise TargetError(f"{self.kind_name} is a plain encoder without classes: explain a scalar "
                              "(e.g. the similarity of two sentences) instead of a class")
        return int(self.config.num_labels)

    def _position_limit(self) -> int:
        limit = super()._position_limit()
        if self.architecture.positions_from_ids:  # positions start after the padding index
            limit -= int(getattr(self.config, "pad_token_id", 1) or 1) + 1
        return limit

    def describe(self) -> dict:
        return {"spec": self.info.spec, "class": self.kind_name, "family": self.text_family,
                "kind": "classifier" if self.is_classifier else "encoder", "layers": self.num_layers,
                "heads": self.num_heads, "pooling": None if self.is_classifier else self.pooling,
                "classes": self.class_names}

    # --- tokenization -----------------------------------------------------------------------
    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, truncate: bool = False,
               max_length: int | None = None) -> TextBatch:
        """Tokenize texts (and second texts of pairs, encoded together) into a padded batch.

        Raises
        ------
        InputError
            An empty text, no tokenizer, or a text longer than the model takes (unless ``truncate``).
        """
        texts = self.checked_texts(texts, pairs)
        if pairs is not None and len(pairs) != len(texts):
            raise InputError(f"{len(pairs)} second texts for {len(texts)} texts: give one per text")
        limit = min(max_length or self.max_length, self.max_length)
        tok = self.tokenizer
        fast = bool(getattr(tok, "is_fast", False))  # character offsets (word scores, spans) need a fast tokenizer
        enc = tok(texts, pairs, padding=True, truncation=False, return_tensors="pt", return_offsets_mapping=fast,
                  return_special_tokens_mask=True, return_token_type_ids=True, verbose=False)
        lengths = enc["attention_mask"].sum(dim=1)
        if int(lengths.max()) > limit:
            if not truncate:
                i = int(lengths.argmax())
                raise InputError(f"text {i + 1} has {int(lengths[i])} tokens but the model takes at most {limit}: "
                                 "shorten it, or truncate (--truncate / truncate=True)")
            enc = tok(texts, pairs, padding=True, truncation=True, max_length=limit, return_tensors="pt",
                      return_offsets_mapping=fast, return_special_tokens_mask=True, return_token_type_ids=True,
                      verbose=False)
        cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
        tokens, special, cls_, sep, words, segments, offsets = [], [], [], [], [], [], []
        for s in range(enc["input_ids"].shape[0]):
            mask = enc["attention_mask"][s].bool()
            ids = enc["input_ids"][s][mask].tolist()
            spec_mask = enc["special_tokens_mask"][s][mask].tolist()
            tokens.append(tok.convert_ids_to_tokens(ids))
            special.append([bool(v) for v in spec_mask])
            cls_.append([t == cls_id for t in ids])
            sep.append([t == sep_id for t in ids])
            try:
                word_ids = enc.word_ids(s)
                seq_ids = enc.sequence_ids(s)
            except (ValueError, AttributeError):  # a slow tokenizer: every token its own word
                word_ids = seq_ids = None
            if word_ids is not None:
                kept = [i for i, m in enumerate(mask.tolist()) if m]
                words.append([None if special[-1][j] else word_ids[i] for j, i in enumerate(kept)])
                segments.append(_segments(seq_ids, kept))
            else:
                words.append([None if sp else j for j, sp in enumerate(special[-1])])
                segments.append(_segments_from_sep(sep[-1]))
            if "offset_mapping" in enc:
                spans = enc["offset_mapping"][s][mask].tolist()
                offsets.append([None if sp else (int(a), int(b)) for (a, b), sp in zip(spans, special[-1])])
        token_type_ids = enc.get("token_type_ids") if self._uses_token_types() else None
        batch = TextBatch(enc["input_ids"], enc["attention_mask"], token_type_ids, tokens, special, cls_, sep,
                          words, segments, offsets)
        return batch.to(self.device)

    def _uses_token_types(self) -> bool:
        return self.architecture.token_types and int(getattr(self.config, "type_vocab_size", 0) or 0) > 1

    def forward(self, batch: TextBatch, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (S, classes) of a classifier, or the last hidden states (S, N, C) of an encoder."""
        if embeds is None:
            embeds = self.embed(batch.input_ids)
        kwargs = {"inputs_embeds": embeds, "attention_mask": batch.attention_mask}
        if batch.token_type_ids is not None and self.architecture.token_types:
            kwargs["token_type_ids"] = batch.token_type_ids
        if self.architecture.positions_from_ids:
            # numbered from the ids (padding-aware), which the embeddings alone do not carry
            pad = self.backbone.embeddings.padding_idx
            real = batch.input_ids.ne(pad).long()
            kwargs["position_ids"] = torch.cumsum(real, dim=1) * real + pad
        out = self.module(**kwargs)
        return out.logits if self.is_classifier else out.last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The classifier's logits read from any layer's token states (B, N, C) with its own head."""
        if not self.is_classifier:
            raise TargetError("a plain encoder has no classification head")
        return self.architecture.head(self.module, self.backbone, hidden)

    def layer_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """A block's output as the last hidden state would be read: through T5's final norm, else as it is."""
        norm = self.architecture.final_norm
        return norm(self.backbone)(hidden) if norm is not None else hidden

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings (B, C) of an encoder: mean over real tokens, or the first token."""
        if self.pooling == "cls":
            return hidden[:, 0]
        return self.pool_mean(hidden, attention_mask)

    def layer_scores(self, hidden: torch.Tensor, attention_mask: torch.Tensor, pool: str = "model") -> torch.Tensor:
        """Classifier logits read out of a layer's output; ``pool='mean'`` first replaces every token
        by the mean of the real tokens (LeGrad's token-mean variant, padding excluded)."""
        if pool == "mean":
            mean = self.pool_mean(hidden, attention_mask)
            hidden = mean[:, None, :].expand_as(hidden)
        elif pool != "model":
            raise MethodError(f"unknown pool {pool!r}: expected 'model' or 'mean'")
        return self.head(hidden)

    def readout_weights(self, num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """(n,) weights of the real tokens the explained score reads (sums to 1).

        Classifiers read the first token ([CLS] / <s>); encoders read what they pool: every real
        token equally (mean pooling, special tokens included, as sentence-transformers does) or
        the first token.
        """
        if self.is_classifier or self.pooling == "cls":
            weights = torch.zeros(num_tokens, device=device, dtype=dtype)
            weights[0] = 1.0
            return weights
        return torch.full((num_tokens,), 1.0 / num_tokens, device=device, dtype=dtype)


def _segments(seq_ids, kept) -> list:
    out, current = [], 0
    for i in kept:
        sid = seq_ids[i] if seq_ids is not None else None
        if sid is not None:
            current = int(sid)
        out.append(current)
    return out


def _segments_from_sep(sep) -> list:
    out, current = [], 0
    for j, is_sep in enumerate(sep):
        out.append(current)
        if is_sep and j < len(sep) - 1:
            current = 1
    return out


def is_encoder(module: nn.Module) -> bool:
    return isinstance(module, nn.Module) and type(module).__name__ in FAMILIES and hasattr(module, "config")


def wrap(module, tokenizer=None, info=None, pooling=None, **options) -> EncoderModel:
    return EncoderModel(module, tokenizer, pooling or "mean", info=info)


register_family(Family("hf-encoder", "text", is_encoder, wrap, priority=10,
                       description=f"the encoders {SUPPORTED_FAMILIES} (base model or ...ForSequenceClassification)"))

__all__ = ["EncoderModel", "FAMILIES", "POOLINGS", "SUPPORTED_FAMILIES", "is_encoder"]

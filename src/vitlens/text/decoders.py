"""Adapters for Hugging Face causal language models: GPT-2, Llama, Mistral, Qwen2, Qwen3.

A :class:`DecoderModel` is a :class:`~vitlens.text.base.TextModel` whose "classes" are the
vocabulary: it explains the score of one next token -- its logit, or its log-probability
(``score='logprob'``) -- read at the last real token of the prompt. Everything else is the encoders'
machinery: the same registered ``AttentionInterface`` function ``vitlens_capture`` (selected through
the model's own config objects for the duration of the call) with Transformers' own ``eager_mask``
registered under the same name, so the causal mask and the padding mask are exactly the eager
model's; grouped-query attention (Llama, Mistral, Qwen) has its keys and values repeated per head
group in that function, as the eager code does; rotary embeddings are applied by the model before the
call. The forward starts from the word embeddings (a detached leaf), so AttnLRP / CP-LRP get their
input, and the methods run on each sequence's real tokens with the last token as the readout.

Batches are padded on the left (as for generation) with position ids that start at 0 at the first
real token, so a padded prompt gives the one-at-a-time result.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vitlens.errors import InputError, MethodError, ModelError, TargetError
from vitlens.models.base import ModelInfo
from vitlens.models.registry import Family, register_family
from vitlens.text.base import TextModel, unsupported_message
from vitlens.text.batch import TextBatch

#: model class name -> family
DECODER_FAMILIES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
#: family -> where its base model, final norm and blocks live: (base model, final norm, blocks)
_LAYOUTS = {"gpt2": ("transformer", "ln_f", "h"), "llama": ("model", "norm", "layers")}
SUPPORTED_DECODERS = "GPT-2 (GPT2LMHeadModel), Llama, Mistral, Qwen2, Qwen3 (...ForCausalLM)"
SCORES = ("logit", "logprob")
#: how a token's text may start when a space precedes it (GPT-2 byte-level BPE, SentencePiece)
_SPACE_MARKS = ("\u0120", "\u2581")


class DecoderModel(TextModel):
    """A Hugging Face causal language model with its tokenizer; explains one next token.

    Parameters
    ----------
    module : nn.Module
        One of the classes in :data:`DECODER_FAMILIES`.
    tokenizer : transformers tokenizer, optional
    score : {'logit', 'logprob'}
        What is explained for a target token: its next-token logit (default), or its log-probability
        log softmax(logits)_t (the logit minus the log-sum-exp over the vocabulary).
    """

    family = "hf-decoder"
    is_causal = True

    def __init__(self, module: nn.Module, tokenizer=None, score: str = "logit", info: ModelInfo | None = None):
        name = type(module).__name__
        if name not in DECODER_FAMILIES:
            raise ModelError(unsupported_message(name))
        if score not in SCORES:
            raise ModelError(f"unknown score {score!r}: expected one of {', '.join(SCORES)}")
        text_family = DECODER_FAMILIES[name]
        base_attr, norm_attr, layers_attr = _LAYOUTS.get(text_family, _LAYOUTS["llama"])
        backbone = getattr(module, base_attr)
        final_norm, layers = getattr(backbone, norm_attr), getattr(backbone, layers_attr)
        # its classes are the vocabulary: the next token
        super().__init__(module, tokenizer, text_family=text_family, backbone=backbone, layers=list(layers),
                         is_classifier=True, info=info)
        self.pooling = "last"
        self.score = score
        self.final_norm = final_norm
        self.lm_head = module.get_output_embeddings()

    # --- facts ------------------------------------------------------------------------------
    @property
    def num_key_value_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def num_classes(self) -> int:
        return int(self.lm_head.out_features)

    def _position_limit(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 1024))

    @property
    def value_name(self) -> str:
        return "next-token log-probability" if self.score == "logprob" else "next-token logit"

    def describe(self) -> dict:
        return {"spec": self.info.spec, "class": self.kind_name, "family": self.text_family, "kind": "causal decoder",
                "layers": self.num_layers, "heads": self.num_heads, "kv_heads": self.num_key_value_heads,
                "score": self.score, "vocabulary": self.num_classes}

    # --- the vocabulary as classes ------------------------------------------------------------
    def class_name(self, index: int) -> str:
        """The token as text, quoted (``' Paris'``)."""
        if self.tokenizer is None:
            return f"token {index}"
        return repr(self.tokenizer.decode([int(index)]))

    def token_id(self, text: str) -> int:
        """The id of the one token ``text`` encodes to (``' Paris'``), or of a raw vocabulary entry
        (``'ĠParis'``); a one-line error when it is several tokens."""
        if self.tokenizer is None:
            raise TargetError("a target token given as text needs a tokenizer: give its id")
        if not isinstance(text, str) or not text:
            raise TargetError("empty target token: give the token's text, e.g. ' Paris'")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
        raw = self.tokenizer.convert_tokens_to_ids(text)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if isinstance(raw, int) and raw >= 0 and raw != unk:
            return raw
        pieces = " + ".join(repr(self.tokenizer.decode([i])) for i in ids) or "nothing"
        raise TargetError(f"target token {text!r} is {len(ids)} tokens for this tokenizer ({pieces}): give one token, "
                          f"e.g. {self.tokenizer.decode(ids[:1])!r}")

    def class_index(self, name: str) -> int:
        return self.token_id(name)

    # --- tokenization -----------------------------------------------------------------------
    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, truncate: bool = False,
               max_length: int | None = None) -> TextBatch:
        """Tokenize prompts into a left-padded batch (the tokenizer's own special tokens, e.g. Llama's BOS).

        ``truncate`` keeps the *end* of a long prompt (the tokens next to the prediction) and a
        leading special token.
        """
        texts = self.checked_texts(texts, pairs, single="a causal decoder reads one text (the prompt)")
        limit = min(max_length or self.max_length, self.max_length)
        tok = self.tokenizer
        special_ids = set(int(i) for i in (tok.all_special_ids or []))
        fast = bool(getattr(tok, "is_fast", False))  # character offsets (word scores, spans) need a fast tokenizer
        rows, spans = [], []
        for i, text in enumerate(texts):
            enc = tok(text, add_special_tokens=True, return_offsets_mapping=fast)
            ids = [int(t) for t in enc["input_ids"]]
            where = [tuple(int(v) for v in o) for o in enc["offset_mapping"]] if fast else [None] * len(ids)
            if len(ids) > limit:
                if not truncate:
                    raise InputError(f"text {i + 1} has {len(ids)} tokens but the model takes at most {limit}: "
                                     "shorten it, or truncate (--truncate / truncate=True)")
                head = 1 if ids[0] in special_ids else 0
                ids = ids[:head] + ids[len(ids) - (limit - head):]
                where = where[:head] + where[len(where) - (limit - head):]
            rows.append(ids)
            spans.append([None if t in special_ids else o for t, o in zip(ids, where)])
        n = max(len(r) for r in rows)
        pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
        input_ids = torch.full((len(rows), n), int(pad), dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        tokens, special, words = [], [], []
        for s, ids in enumerate(rows):
            input_ids[s, n - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[s, n - len(ids):] = 1
            pieces = tok.convert_ids_to_tokens(ids)
            tokens.append(pieces)
            special.append([t in special_ids for t in ids])
            words.append(_words(tok, pieces, special[-1]))
        false = [[False] * len(r) for r in rows]
        batch = TextBatch(input_ids, mask, None, tokens, special, [list(f) for f in false], [list(f) for f in false],
                          words, [[0] * len(r) for r in rows], spans if fast else [])
        return batch.to(self.device)

    # --- running it -------------------------------------------------------------------------
    @staticmethod
    def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """0, 1, 2, ... from each sequence's first real token (left padding), 1 on padding (as generation)."""
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.masked_fill(attention_mask == 0, 1)

    @staticmethod
    def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
        """(S,) position of each sequence's last real token (left or right padding)."""
        n = attention_mask.shape[-1]
        steps = torch.arange(1, n + 1, device=attention_mask.device)
        return ((attention_mask != 0).long() * steps).argmax(dim=-1)

    def hidden_states(self, batch: TextBatch, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden states (S, N, C), after the final norm."""
        if embeds is None:
            embeds = self.embed(batch.input_ids)
        mask = batch.attention_mask
        out = self.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=self.position_ids(mask),
                            use_cache=False)
        return out.last_hidden_state

    def forward(self, batch: TextBatch, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token scores (S, vocabulary) at each sequence's last real token."""
        hidden = self.hidden_states(batch, embeds)
        last = self.last_index(batch.attention_mask)
        return self._scores(self.lm_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]))

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits, dim=-1) if self.score == "logprob" else logits

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token scores read from the last position of any layer's token states (final norm + LM head)."""
        return self._scores(self.lm_head(self.final_norm(hidden[:, -1])))

    def layer_scores(self, hidden: torch.Tensor, attention_mask: torch.Tensor, pool: str = "model") -> torch.Tensor:
        """Next-token scores read out of a layer's output with the final norm and the LM head: at the last
        real token (``pool='model'``), or from the mean of the real tokens (``pool='mean'``)."""
        if pool == "mean":
            state = self.pool_mean(hidden, attention_mask)
        elif pool == "model":
            state = hidden[torch.arange(hidden.shape[0], device=hidden.device), self.last_index(attention_mask)]
        else:
            raise MethodError(f"unknown pool {pool!r}: expected 'model' or 'mean'")
        return self._scores(self.lm_head(self.final_norm(state)))

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), self.last_index(attention_mask)]

    def readout_weights(self, num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """The explained score is read at the last real token: one-hot there."""
        weights = torch.zeros(num_tokens, device=device, dtype=dtype)
        weights[-1] = 1.0
        return weights


def _words(tok, pieces: list, special: list) -> list:
    """Word index per token: a new word where a space precedes the token (None for special tokens)."""
    out, word = [], -1
    for piece, is_special in zip(pieces, special):
        if is_special:
            out.append(None)
            continue
        try:
            text = tok.convert_tokens_to_string([piece])
        except Exception:  # noqa: BLE001 - some tokenizers refuse single pieces
            text = piece
        if word < 0 or piece.startswith(_SPACE_MARKS) or text[:1].isspace():
            word += 1
        out.append(word)
    return out


def is_decoder_model(module) -> bool:
    return isinstance(module, nn.Module) and type(module).__name__ in DECODER_FAMILIES and hasattr(module, "config")


def wrap(module, tokenizer=None, info=None, score=None, **options) -> DecoderModel:
    return DecoderModel(module, tokenizer, score or "logit", info=info)


register_family(Family("hf-decoder", "text", is_decoder_model, wrap, priority=20,
                       description=f"the causal decoders {SUPPORTED_DECODERS}"))

__all__ = ["DECODER_FAMILIES", "DecoderModel", "SCORES", "SUPPORTED_DECODERS", "is_decoder_model"]

"""Token ids of a batch of padded sequences, and what vitlens needs to read and draw them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    offsets : list of list
        Per real token: its (start, end) character range in its text (the pair's text for segment 1),
        None for special tokens; empty when the tokenizer gives no offsets (a slow tokenizer).
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
    offsets: list = field(default_factory=list)

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


__all__ = ["TextBatch"]

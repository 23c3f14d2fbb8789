"""Text transformers: attention views, per-head statistics and token attributions for BERT-like models
and GPT-style causal decoders.

``load_text_model`` wraps Hugging Face encoders and sequence classifiers (BERT incl. MiniLM, RoBERTa,
XLM-RoBERTa, CamemBERT, DistilBERT, ALBERT, ELECTRA) and causal language models (GPT-2, Llama,
Mistral, Qwen2, Qwen3; explaining one next token, or every token of a continuation with
``explain_continuation``) and encoder-decoders (T5 / mT5, BART, Marian: ``explain_seq2seq``, target tokens
attributed to the source, encoder, decoder and cross-attention), ``explain_text`` runs the image methods on
token sequences, ``attention_views`` writes the attention views; ``vitlens text`` is the command
line. See docs/text.md.
"""

from vitlens.text.base import TextModel
from vitlens.text.batch import TextBatch
from vitlens.text.decoders import DECODER_FAMILIES, DecoderModel
from vitlens.text.encoders import FAMILIES, EncoderModel
from vitlens.text.loading import load_text_model, minilm_path
from vitlens.text.api import (Prediction, SequenceResult, TextItem, TextResult, VIEWS, attention_views, explain_text,
                              write_item)
from vitlens.text.task import TEXT_METHODS, Objective, TextTask, parse_text_methods, run_text_batch
from vitlens.text.continuation import ContinuationResult, explain_continuation
from vitlens.text.stats import HeadStatistics, head_statistics, reference_patterns, reference_statistics
from vitlens.text.seq2seq import SEQ2SEQ_FAMILIES, Seq2SeqModel, Seq2SeqResult, explain_seq2seq

__all__ = ["ContinuationResult", "DECODER_FAMILIES", "DecoderModel", "EncoderModel", "FAMILIES", "HeadStatistics",
           "SEQ2SEQ_FAMILIES", "Seq2SeqModel", "Seq2SeqResult", "explain_seq2seq",
           "Objective", "Prediction", "SequenceResult", "TEXT_METHODS", "TextBatch",
           "TextItem", "TextModel", "TextResult", "TextTask", "VIEWS", "attention_views", "explain_continuation",
           "explain_text",
           "head_statistics", "load_text_model", "minilm_path", "parse_text_methods", "reference_patterns",
           "reference_statistics", "run_text_batch", "write_item"]

"""Text transformers: attention views, per-head statistics and token attributions for BERT-like models.

``load_text_model`` wraps Hugging Face encoders and sequence classifiers (BERT, RoBERTa, DistilBERT,
ALBERT, ELECTRA; MiniLM is a BERT), ``explain_text`` runs the image methods on token sequences,
``attention_views`` writes the attention views; ``vitlens text`` is the command line. See docs/text.md.
"""

from vitlens.text.adapters import FAMILIES, TextBatch, TextModel, load_text_model, minilm_path

__all__ = ["FAMILIES", "TextBatch", "TextModel", "load_text_model", "minilm_path"]

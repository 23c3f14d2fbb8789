"""Adapter for a user's own image transformer: any ``nn.Module`` whose attention vitlens can see.

This is the family of "my model": a ViT written with ``torch.nn.TransformerEncoder`` /
``nn.MultiheadAttention``, or with attention modules of its own. The attention layers are

* every ``nn.MultiheadAttention`` the forward calls as self-attention (``mha(x, x, x)``, either
  ``batch_first``, whatever ``need_weights`` / ``average_attn_weights`` the code passes): during a
  vitlens call each instance gets the explicit forward of :mod:`vitlens.models.mha`;
* or the modules named with glob patterns (``attention_layers=["encoder.layers.*.self_attn"]``,
  matched with :func:`fnmatch.fnmatchcase` against qualified module names). A named
  ``nn.MultiheadAttention`` is captured as above; any other named module must *output* the
  post-softmax probabilities (B, heads, N, N), alone or inside a tuple (a ``Softmax``, or the
  attention-dropout module that timm-style code applies to the probabilities): a forward hook reports
  them to the recorder and passes on what the recorder returns, so the gradients vitlens takes are
  those of the tensor that multiplied the values.

Nothing about the model is configured by hand beyond that. One dry run at the model's input size
(:class:`Survey`, hooks removed afterwards) finds the number of attention calls per forward, the token
count N, the patch grid (the patchify ``Conv2d``: kernel == stride) and so the prefix tokens, each
layer's block (the outermost module around one attention layer whose output is the token stream:
``nn.TransformerEncoderLayer``, a ``Block``) and its layout ((B, N, C) or (N, B, C)), the Grad-CAM
layer of each block (the norm that runs right before its attention, else the block output), and how
the classifier reads the last block: the readout (CLS token, mean of the patch tokens, mean of all
tokens) and the head (an optional final norm + the classifier ``nn.Linear``) are the candidate that
reproduces the model's own logits. Without one, LeGrad (which needs the head) is refused and the
other methods read the CLS row when there is a prefix token, else the patch mean; ``readout=`` says
it explicitly.

``nn.TransformerEncoderLayer`` has a fused C++ path (``torch._transformer_encoder_layer_fwd``) that
never calls ``self_attn``, and ``nn.TransformerEncoder`` may convert its input to a nested tensor.
During a vitlens call both are turned off *per instance* through the attributes their fast-path
conditions read (``activation_relu_or_gelu``, ``use_nested_tensor``), restored exactly afterwards;
the global ``torch.backends.mha`` switch is never touched.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from vitlens.errors import MethodError, ModelError, one_line
from vitlens.models.base import ImageModel, ModelInfo
from vitlens.models.capture import AttentionRecorder, attribute_set, swapped_forward
from vitlens.models.mha import check_capturable, is_self_attention, mha_capturing_forward
from vitlens.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from vitlens.models.registry import Family, NotThisFamily, register_family

#: readouts: the CLS token (token 0); the mean of the patch tokens (prefix tokens left out, timm's
#: ``global_pool='avg'``); the mean of all tokens
READOUTS = ("cls", "mean", "mean-all")
DEFAULT_INPUT_SIZE = 224
_DRY_RUN_BATCH = 2


def is_torch_attention_model(module: nn.Module) -> bool:
    """The family predicate: the module contains a ``torch.nn.MultiheadAttention``."""
    return any(isinstance(m, nn.MultiheadAttention) for m in module.modules())


@dataclass
class Survey:
    """What the dry run found (module names, never tensors, so a deep copy of the adapter stays valid).

    Attributes
    ----------
    input_size : (int, int)
    calls : list of str
        The attention module of each attention call, in forward order (one entry per layer).
    num_tokens, num_prefix : int
    grid : (int, int)
    patch_size : (int, int) or None
        Kernel of the patchify convolution, when there is one.
    num_classes : int
    blocks : list of str or None
        Per call, the module whose output is the token stream after that layer (None: not found).
    seq_first : dict
        Module name -> True when its (token-shaped) output is (N, B, C).
    cam_layers : list of str or None
        Per call, the Grad-CAM target layer (pre-attention norm, else the block output).
    cam_before_attention : list of bool
        Per call, whether that layer runs before the attention (a pre-norm block's norm1).
    readout : str
    head : tuple or None
        ``(norm name or None, norm before pooling?, head name)`` reproducing the logits from the last
        block output with ``readout``; None when no candidate did (``head_problem`` says why).
    """

    input_size: tuple
    calls: list
    num_tokens: int
    num_prefix: int
    grid: tuple
    patch_size: tuple | None
    num_classes: int
    blocks: list | None = None
    seq_first: dict = field(default_factory=dict)
    cam_layers: list | None = None
    cam_before_attention: list = field(default_factory=list)
    readout: str = "cls"
    head: tuple | None = None
    head_problem: str = ""


class TorchAttentionModel(ImageModel):
    """A user's image classifier with ``nn.MultiheadAttention`` or named attention layers.

    Parameters
    ----------
    module : nn.Module
    preprocess : Preprocess
        Its input size is the size the dry run (and every later input) uses.
    attention_layers : sequence of str, optional
        Glob patterns of the attention modules (default: every self-attention
        ``nn.MultiheadAttention``).
    readout : {'cls', 'mean', 'mean-all'}, optional
        Which token rows the classifier reads (default: found by the dry run).
    """

    family = "torch-attention"

    def __init__(self, module: nn.Module, preprocess: Preprocess, class_names: Sequence[str] | None = None,
                 info: ModelInfo | None = None, attention_layers: Sequence[str] | str | None = None,
                 readout: str | None = None):
        self._survey: Survey | None = None
        super().__init__(module, preprocess, class_names, info)
        if readout is not None and readout not in READOUTS:
            raise ModelError(f"unknown readout {readout!r}: expected one of {', '.join(READOUTS)}")
        self.requested_readout = readout
        self.attention_patterns = _patterns(attention_layers)
        self.named = _match_patterns(module, self.attention_patterns) if self.attention_patterns else None
        if self.named is None and not is_torch_attention_model(module):
            raise ModelError(f"{type(module).__name__} has no nn.MultiheadAttention: name its attention layers "
                             "with attention_layers=['PATTERN', ...] (modules that output the attention probabilities)")

    # The dry run depends on the input size: a new preprocessing means new facts.
    @property
    def preprocess(self) -> Preprocess:
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value: Preprocess) -> None:
        self._preprocess = value
        self._survey = None

    @property
    def survey(self) -> Survey:
        return self.prepare()

    def prepare(self) -> Survey:
        """The dry run (once per preprocessing): what the adapter knows about the model."""
        if self._survey is None:
            self._survey = _run_survey(self)
        return self._survey

    def unsupported_methods(self) -> dict:
        s = self.survey
        refused = {}
        if s.head is None:
            refused["legrad"] = f"LeGrad cannot score the blocks of {type(self.module).__name__}: {s.head_problem}"
        modules = dict(self.module.named_modules())
        hooked = [name for name in dict.fromkeys(s.calls) if not isinstance(modules[name], nn.MultiheadAttention)]
        if hooked:
            for name in ("attnlrp", "cp-lrp"):
                refused[name] = (f"AttnLRP / CP-LRP need the attention computed by vitlens, but '{hooked[0]}' is a "
                                 "hooked module: use nn.MultiheadAttention, or the other methods")
        return refused

    # --- facts ----------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.survey.num_classes

    @property
    def num_layers(self) -> int:
        return len(self.survey.calls)

    @property
    def num_prefix_tokens(self) -> int:
        return self.survey.num_prefix

    @property
    def patch_size(self) -> tuple[int, int]:
        s = self.survey
        if s.patch_size is not None:
            return s.patch_size
        return s.input_size[0] // s.grid[0], s.input_size[1] // s.grid[1]

    def grid(self, input_hw):
        return self.survey.grid

    def fixed_input_size(self):
        # the dry run (token count, grid, prefix) holds for this size only
        return tuple(self.preprocess.input_size)

    def check_input(self, x: torch.Tensor) -> None:
        size = self.fixed_input_size()
        if tuple(x.shape[-2:]) != size:
            raise ModelError(f"input of {x.shape[-2]}x{x.shape[-1]} pixels does not fit the model, loaded for "
                             f"{size[0]}x{size[1]}: pass input_size= to load_model for another size")

    def readout_weights(self, num_tokens, device=None, dtype=torch.float32):
        weights = torch.zeros(num_tokens, device=device, dtype=dtype)
        readout, prefix = self.survey.readout, self.num_prefix_tokens
        if readout == "cls":
            weights[0] = 1.0
        elif readout == "mean":
            weights[prefix:] = 1.0 / (num_tokens - prefix)
        else:
            weights[:] = 1.0 / num_tokens
        return weights

    # --- Grad-CAM ----------------------------------------------------------------------------
    def block_norm_names(self) -> list[str]:
        layers = self.survey.cam_layers
        if not layers:
            raise MethodError(f"Grad-CAM has no default target layer in {type(self.module).__name__}: vitlens found no "
                              "block around its attention layers; name one with the method's layers parameter")
        return list(dict.fromkeys(layers))

    def default_cam_layers(self) -> list[str]:
        """What enters the last attention layer: its block's pre-attention norm, or for a post-norm block the
        previous block's output (the last block's own output would give an all-zero map under CLS readout:
        only the CLS row of it reaches the logits)."""
        names = self.block_norm_names()
        s = self.survey
        if not s.cam_before_attention[-1] and len(s.cam_layers) > 1:
            return [s.cam_layers[-2]]
        return names[-1:]

    def spatial_layer_names(self) -> list[str]:
        s = self.survey
        return list(dict.fromkeys((s.cam_layers or []) + (s.blocks or [])))

    def cam_spatial(self, activation, grid, layer):
        n = self.survey.num_tokens
        seq_first = self.survey.seq_first.get(layer)
        if seq_first is None:  # a layer the dry run did not see: go by the shape
            seq_first = activation.dim() == 3 and activation.shape[0] == n and activation.shape[1] != n
        if seq_first and activation.dim() == 3:
            activation = activation.transpose(0, 1)
        return super().cam_spatial(activation, grid, layer)

    # --- running it ------------------------------------------------------------------------
    def logits(self, x):
        return _logits(self.module(x))

    def _head(self, hidden):
        s = self.survey
        if s.head is None:
            raise MethodError(f"LeGrad cannot score the blocks of {type(self.module).__name__}: {s.head_problem}")
        modules = dict(self.module.named_modules())
        norm_name, norm_first, head_name = s.head
        return _apply_head(hidden, modules[norm_name] if norm_name is not None else None, norm_first, s.readout,
                           s.num_prefix, modules[head_name])

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        s = self.survey
        modules = dict(self.module.named_modules())
        hooked = [name for name in dict.fromkeys(s.calls) if not isinstance(modules[name], nn.MultiheadAttention)]
        if hooked and recorder.rules_attention:
            # a hook sees the probabilities only after they are computed: it cannot change how
            # Q K^T and A V pass relevance (AttnLRP's rules), so the result would be silently wrong
            raise MethodError(f"AttnLRP / CP-LRP need the attention computed by vitlens, but '{hooked[0]}' is a "
                              "hooked module: use nn.MultiheadAttention, or the other methods")
        if recorder.keep_block_outputs and s.head is None:
            raise MethodError(f"LeGrad cannot score the blocks of {type(self.module).__name__}: {s.head_problem}")
        next_layer = itertools.count().__next__
        with contextlib.ExitStack() as stack:
            disable_fast_paths(self.module, stack)
            for name in dict.fromkeys(s.calls):
                module = modules[name]
                if isinstance(module, nn.MultiheadAttention):
                    forward = mha_capturing_forward(module, next_layer, recorder, name=f"attention layer '{name}'")
                    stack.enter_context(swapped_forward(module, forward))
                else:
                    hook = module.register_forward_hook(_probability_hook(name, next_layer, recorder))
                    stack.callback(hook.remove)
            if recorder.keep_block_outputs:
                next_block = itertools.count().__next__
                for name in dict.fromkeys(s.blocks):
                    hook = modules[name].register_forward_hook(_block_hook(next_block, recorder, s.seq_first[name]))
                    stack.callback(hook.remove)
            yield recorder


def disable_fast_paths(module: nn.Module, stack: contextlib.ExitStack) -> None:
    """Turn off the fused paths of ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` per instance.

    Their fast-path conditions (torch 2.x, ``nn/modules/transformer.py``) read
    ``self.activation_relu_or_gelu`` (falsy: no ``_transformer_encoder_layer_fwd``, which bypasses
    ``self_attn.forward``) and ``self.use_nested_tensor``; only the fast path reads either.
    """
    for m in module.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and hasattr(m, "activation_relu_or_gelu"):
            stack.enter_context(attribute_set(m, "activation_relu_or_gelu", 0))
        elif isinstance(m, nn.TransformerEncoder) and hasattr(m, "use_nested_tensor"):
            stack.enter_context(attribute_set(m, "use_nested_tensor", False))


# --- hooks ----------------------------------------------------------------------------------------
def _find_probabilities(output):
    """(probabilities, rebuild) for an output that is, or holds, a (B, heads, N, N) tensor; (None, None) else."""
    if isinstance(output, torch.Tensor):
        return (output, lambda t: t) if _is_square_4d(output) else (None, None)
    if isinstance(output, (tuple, list)):
        for i, item in enumerate(output):
            if isinstance(item, torch.Tensor) and _is_square_4d(item):
                def rebuild(t, i=i):
                    items = list(output)
                    items[i] = t
                    return type(output)(items) if isinstance(output, list) else tuple(items)

                return item, rebuild
    return None, None


def _is_square_4d(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.shape[-1] == t.shape[-2]


def _describe(output) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of " + ", ".join(
            str(tuple(o.shape)) if isinstance(o, torch.Tensor) else type(o).__name__ for o in output)
    return type(output).__name__


def _probabilities_of(name: str, output):
    """The (B, heads, N, N) probabilities in a named layer's output and how to rebuild the output around
    a replacement; a one-line error when there are none."""
    probs, rebuild = _find_probabilities(output)
    if probs is None:
        raise ModelError(f"attention layer '{name}' outputs {_describe(output)}, not the attention "
                         "probabilities (B, heads, N, N)")
    return probs, rebuild


def _probability_hook(name, next_layer, recorder):
    def hook(module, inputs, output):
        probs, rebuild = _probabilities_of(name, output)
        # what the recorder returns continues downstream: gradients are those of this tensor
        return rebuild(recorder.on_probabilities(next_layer(), probs))

    return hook


def _block_hook(next_block, recorder, seq_first):
    def hook(module, inputs, output):
        recorder.on_block_output(next_block(), output.transpose(0, 1) if seq_first else output)

    return hook


def _logits(out):
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _pool(hidden, readout, prefix):
    if readout == "cls":
        return hidden[:, 0]
    if readout == "mean":
        return hidden[:, prefix:].mean(dim=1)
    return hidden.mean(dim=1)


def _apply_head(hidden, norm, norm_first, readout, prefix, head):
    """head(pool(norm(hidden))) or head(norm(pool(hidden))), for a (B, N, C) stream."""
    if norm is None:
        return head(_pool(hidden, readout, prefix))
    if norm_first:
        return head(_pool(norm(hidden), readout, prefix))
    return head(norm(_pool(hidden, readout, prefix)))


# --- naming the attention layers ------------------------------------------------------------------
def _patterns(attention_layers) -> list[str]:
    if attention_layers is None:
        return []
    if isinstance(attention_layers, str):
        attention_layers = [attention_layers]
    patterns = [p.strip() for item in attention_layers for p in str(item).split(",") if p.strip()]
    if not patterns:
        raise ModelError("attention_layers is empty: give glob patterns of module names, "
                         "e.g. 'encoder.layers.*.self_attn'")
    return patterns


def _match_patterns(module: nn.Module, patterns: list[str]) -> list[str]:
    """Module names matched by the patterns, in model order; one-line errors for no match or nesting."""
    names = [name for name, _ in module.named_modules() if name]
    matched: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ModelError(f"attention_layers pattern '{pattern}' matches no module of {type(module).__name__}; "
                             f"candidates: {', '.join(_candidates(module)) or 'see model.named_modules()'}")
        matched.extend(h for h in hits if h not in matched)
    matched.sort(key=names.index)
    for outer in matched:
        inner = next((n for n in matched if n.startswith(outer + ".")), None)
        if inner is not None:
            raise ModelError(f"attention_layers names both '{outer}' and its submodule '{inner}': name one of them")
    return matched


def _candidates(module: nn.Module, count: int = 5) -> list[str]:
    """A few module names that look like attention layers, for error messages."""
    found = []
    for name, m in module.named_modules():
        lowered = name.rsplit(".", 1)[-1].lower()
        if name and (isinstance(m, (nn.MultiheadAttention, nn.Softmax)) or "attn" in lowered or "attention" in lowered):
            found.append(name)
    return found[:count] + (["..."] if len(found) > count else [])


# --- the dry run ----------------------------------------------------------------------------------
class _Events:
    """Everything the dry run sees, in the order it happens."""

    def __init__(self):
        self.items: list = []  # ("attn", module name) or ("out", module name, output)
        self.calls: list[str] = []
        self.counter = itertools.count()

    def attention_call(self, name: str) -> int:
        self.items.append(("attn", name))
        self.calls.append(name)
        return next(self.counter)


def _run_survey(model: TorchAttentionModel) -> Survey:
    excluded: set = set()
    while True:
        survey = _survey_once(model, excluded)
        if isinstance(survey, Survey):
            return survey
        excluded |= survey  # MHA modules used for cross-attention: not attention layers; run again without them


def _survey_once(model: TorchAttentionModel, excluded: set):
    module = model.module
    modules = dict(module.named_modules())
    if model.named is not None:
        selected = list(model.named)
    else:
        selected = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention) and n not in excluded]
    h, w = model.preprocess.input_size
    generator = torch.Generator().manual_seed(0)
    # a random image: every token differs, so candidate readouts give different logits
    x = torch.randn(_DRY_RUN_BATCH, 3, h, w, generator=generator).to(device=model.device, dtype=model.dtype)
    events, recorder = _Events(), AttentionRecorder()
    crossed: set = set()
    ancestors = {a for name in selected for a in _ancestors(name)}
    with model.eval_mode(), torch.no_grad(), contextlib.ExitStack() as stack:
        disable_fast_paths(module, stack)
        for name in selected:
            m = modules[name]
            if isinstance(m, nn.MultiheadAttention):
                stack.enter_context(swapped_forward(m, _probe_forward(m, name, events, recorder, crossed,
                                                                      strict=model.named is not None)))
            else:
                stack.callback(m.register_forward_hook(_probe_hook(name, events, recorder)).remove)
        for name, m in modules.items():
            if name and (name in ancestors or _is_norm(m) or isinstance(m, (nn.Linear, nn.Conv2d))):
                stack.callback(m.register_forward_hook(_record_output(name, events)).remove)
        try:
            logits = _logits(module(x))
        except ModelError:
            raise
        except Exception as exc:  # the user's forward: any error means it does not take this input
            raise ModelError(f"{type(module).__name__} fails on a {h}x{w} input ({type(exc).__name__}: "
                             f"{one_line(exc)}): pass input_size= to load_model (the size it was trained on)") from None
    if crossed:
        return crossed
    return _conclude(model, selected, events, recorder, logits, modules)


def _probe_forward(mha, name, events, recorder, crossed, strict):
    original = mha.forward

    def forward(query, key=None, value=None, *args, **kwargs):
        if not strict and not (is_self_attention(query, key, value) and query.dim() == 3):
            crossed.add(name)  # cross-attention (an attention-pooling head, a decoder): not a layer here
            return original(query, key, value, *args, **kwargs)
        check_capturable(mha, f"attention layer '{name}'")
        capturing = mha_capturing_forward(mha, lambda: events.attention_call(name), recorder,
                                          name=f"attention layer '{name}'")
        return capturing(query, key, value, *args, **kwargs)

    return forward


def _probe_hook(name, events, recorder):
    def hook(module, inputs, output):
        probs, _ = _probabilities_of(name, output)
        rows = probs.sum(dim=-1)
        if float(probs.min()) < -1e-6 or not torch.allclose(rows, torch.ones_like(rows), atol=1e-3):
            raise ModelError(f"attention layer '{name}' outputs a (B, heads, N, N) tensor whose rows are not "
                             "probabilities (not >= 0 summing to 1): name the module that outputs the softmax")
        recorder.on_probabilities(events.attention_call(name), probs)

    return hook


def _record_output(name, events):
    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor):
            events.items.append(("out", name, output))

    return hook


def _is_norm(m: nn.Module) -> bool:
    return "Norm" in type(m).__name__ and not isinstance(m, nn.modules.batchnorm._BatchNorm)


def _ancestors(name: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b'] (the root '' left out), outermost first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _inside(name: str, parent: str) -> bool:
    return name == parent or name.startswith(parent + ".")


def _token_layout(t, batch, n):
    """None, or True / False for an (N, B, C) / (B, N, C) token tensor."""
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        return None
    if t.shape[0] == batch and t.shape[1] == n:
        return False
    if t.shape[0] == n and t.shape[1] == batch:
        return True
    return None


def _conclude(model, selected, events, recorder, logits, modules) -> Survey:
    module = model.module
    calls = events.calls
    if not calls:
        if model.named is not None:
            raise ModelError(f"the forward of {type(module).__name__} never calls the named attention layers: "
                             "name the modules that output the attention probabilities")
        # e.g. a CNN whose only nn.MultiheadAttention pools features by cross-attention: not a ViT
        raise NotThisFamily(f"the forward of {type(module).__name__} never calls nn.MultiheadAttention as "
                            "self-attention: name its attention layers with attention_layers=['PATTERN', ...]")
    uncalled = [n for n in selected if n not in calls and model.named is not None]
    if uncalled:
        raise ModelError(f"attention layer '{uncalled[0]}' is not called by the forward of {type(module).__name__}")
    selected = list(dict.fromkeys(calls))  # an MHA module the forward never calls is no layer
    shapes = {tuple(a.shape[-2:]) for a in recorder.attentions}
    if len(shapes) != 1:
        raise ModelError(f"the attention layers of {type(module).__name__} attend over different token counts "
                         f"({sorted(s[0] for s in shapes)}): vitlens needs one token sequence")
    n = recorder.attentions[0].shape[-1]
    batch = _DRY_RUN_BATCH
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise ModelError(f"{type(module).__name__} returns {_describe(logits)}, not (batch, classes) logits")
    grid, patch_size, patch_conv = _find_grid(model, events, n, modules)
    prefix = n - grid[0] * grid[1]
    survey = Survey(tuple(model.preprocess.input_size), list(calls), n, prefix, grid, patch_size, int(logits.shape[1]))
    attn_positions = [i for i, item in enumerate(events.items) if item[0] == "attn"]
    survey.blocks = _find_blocks(selected, events, attn_positions, batch, n, patch_conv)
    if survey.blocks is not None:
        for name in survey.blocks:
            survey.seq_first[name] = _layout_of(events, name, batch, n)
    survey.cam_layers = _find_cam_layers(survey, events, attn_positions, batch, n, modules)
    _find_head(model, survey, events, logits, modules, batch)
    return survey


def _layout_of(events, name, batch, n):
    for item in events.items:
        if item[0] == "out" and item[1] == name:
            layout = _token_layout(item[2], batch, n)
            if layout is not None:
                return layout
    return False


def _find_grid(model, events, n, modules):
    """(h, w), the patch size and the patch convolution's name: the last patchify Conv2d (kernel == stride)
    before the first attention call whose output fits in N tokens; else the grid of the input's aspect with
    the fewest prefix tokens (no patch size, no convolution)."""
    first_attention = next(i for i, item in enumerate(events.items) if item[0] == "attn")
    found = None
    for item in events.items[:first_attention]:
        m = modules[item[1]]
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == tuple(m.stride) and item[2].dim() == 4:
            h, w = item[2].shape[-2:]
            if 0 < h * w <= n:
                found = ((int(h), int(w)), (int(m.kernel_size[0]), int(m.kernel_size[1])), item[1])
    if found is not None:
        return found
    H, W = model.preprocess.input_size
    for prefix in range(0, min(n, 17)):
        side = n - prefix
        for h in range(1, side + 1):
            if side % h == 0 and H % h == 0 and W % (side // h) == 0 and H // h == W // (side // h):
                return (h, side // h), None, None
    raise ModelError(f"cannot place the {n} tokens of {type(model.module).__name__} on a patch grid of its "
                     f"{H}x{W} input: vitlens needs prefix tokens followed by the patches, row by row")


def _find_blocks(selected, events, attn_positions, batch, n, patch_conv):
    """Per attention call, the outermost module around that layer alone whose output is the token stream."""
    block_of = {}
    outputs = {item[1] for item in events.items if item[0] == "out" and _token_layout(item[2], batch, n) is not None}
    for name in selected:
        others = [o for o in selected if o != name]
        candidates = [a for a in _ancestors(name)
                      if not any(_inside(o, a) for o in others) and not (patch_conv and _inside(patch_conv, a))]
        candidates = [a for a in candidates if a in outputs]
        if not candidates:
            return None
        block_of[name] = candidates[0]
    blocks = []
    ends = attn_positions[1:] + [len(events.items)]
    for start, end in zip(attn_positions, ends):
        name = block_of[events.items[start][1]]
        done = [i for i in range(start, end) if events.items[i][0] == "out" and events.items[i][1] == name]
        if len(done) != 1:  # the block must finish once after its attention and before the next one
            return None
        blocks.append(name)
    return blocks


def _find_cam_layers(survey, events, attn_positions, batch, n, modules):
    """Per call: the last norm inside the block that ran since the previous attention call (a pre-norm
    block's norm1), else the norm whose output is the block output (post-norm), else the block."""
    if survey.blocks is None:
        return None
    layers = []
    starts = [0] + attn_positions[:-1]
    ends = attn_positions[1:] + [len(events.items)]
    items = events.items
    for call, block in enumerate(survey.blocks):
        before = [it for it in items[starts[call]:attn_positions[call]]
                  if it[0] == "out" and _inside(it[1], block) and it[1] != block and _is_norm(modules[it[1]])
                  and _token_layout(it[2], batch, n) is not None]
        chosen = before[-1][1] if before else None
        survey.cam_before_attention.append(chosen is not None)
        if chosen is None:
            after = items[attn_positions[call]:ends[call]]
            block_out = next(it[2] for it in after if it[0] == "out" and it[1] == block)
            same = [it[1] for it in after if it[0] == "out" and it[1] != block and _inside(it[1], block)
                    and it[2] is block_out]
            chosen = same[-1] if same else block
        layers.append(chosen)
        if chosen not in survey.seq_first:
            out = next(it[2] for it in items if it[0] == "out" and it[1] == chosen)
            survey.seq_first[chosen] = bool(_token_layout(out, batch, n))
    return layers


def _find_head(model, survey, events, logits, modules, batch) -> None:
    """Which readout, final norm and classifier reproduce the logits from the last block's output."""
    prefix, n = survey.num_prefix, survey.num_tokens
    readouts = [model.requested_readout] if model.requested_readout else \
        (["cls", "mean", "mean-all"] if prefix else ["mean"])
    if model.requested_readout == "cls" and prefix == 0:
        raise ModelError(f"readout='cls' needs a class token, but {type(model.module).__name__} has none "
                         f"({n} tokens for a {survey.grid[0]}x{survey.grid[1]} grid)")
    survey.readout = model.requested_readout or ("cls" if prefix else "mean")
    tried = " or ".join(readouts)
    if survey.blocks is None:
        survey.head_problem = ("vitlens found no block output around each attention layer (the residual stream); "
                               "use another method")
        return
    last_block = survey.blocks[-1]
    last_done = max(i for i, it in enumerate(events.items) if it[0] == "out" and it[1] == last_block)
    hidden = events.items[last_done][2]
    if survey.seq_first[last_block]:
        hidden = hidden.transpose(0, 1)
    heads = [it[1] for it in events.items[last_done:] if it[0] == "out" and isinstance(modules[it[1]], nn.Linear)
             and it[2].shape == logits.shape and torch.equal(it[2], logits)]
    if not heads:
        survey.head_problem = ("no nn.Linear after the last block outputs the logits (vitlens reads the classifier "
                               "as an nn.Linear on the pooled tokens); use another method")
        return
    head = modules[heads[-1]]
    norms = [None] + list(dict.fromkeys(
        it[1] for it in events.items[last_done + 1:] if it[0] == "out" and _is_norm(modules[it[1]])
        and _token_or_pooled(it[2], batch, n)))
    tolerance = {torch.float64: 1e-9, torch.float32: 1e-4}.get(logits.dtype, 1e-2) * max(1.0, float(logits.abs().max()))
    with model.eval_mode(), torch.no_grad():
        for readout in readouts:
            for norm_name in norms:
                for norm_first in ((True,) if norm_name is None else (True, False)):
                    norm = modules[norm_name] if norm_name is not None else None
                    try:
                        candidate = _apply_head(hidden, norm, norm_first, readout, prefix, head)
                    except RuntimeError:
                        continue
                    if candidate.shape == logits.shape and float((candidate - logits).abs().max()) <= tolerance:
                        survey.readout, survey.head = readout, (norm_name, norm_first, heads[-1])
                        return
    survey.head_problem = (f"no {tried} pooling of the last block's output (with or without a final norm) through "
                           f"'{heads[-1]}' reproduces the logits; pass readout='cls' or 'mean' to load_model if the "
                           "model pools that way, else use another method")


def _token_or_pooled(t, batch, n) -> bool:
    return _token_layout(t, batch, n) is not None or (t.dim() == 2 and t.shape[0] == batch)


# --- building it ---------------------------------------------------------------------------------
def default_input_size(module: nn.Module) -> tuple[int, int] | None:
    """The input size a positional embedding and a patchify convolution imply, or None.

    A learned position embedding of T tokens (a parameter named ``*pos*`` whose last dimension is the
    patch convolution's width) covers p prefix tokens and an s x s grid with T = p + s^2; the smallest
    such p (0 to 16) is taken: for s >= 2, s^2 + p is not another square for any p < 2s + 1.
    """
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == tuple(m.stride)
             and m.in_channels == 3]
    if not convs:
        return None
    conv = convs[0]
    width = conv.out_channels
    for name, p in module.named_parameters():
        if "pos" in name.rsplit(".", 1)[-1].lower() and p.dim() in (2, 3) and p.shape[-1] == width:
            tokens = p.numel() // width
            for prefix in range(0, 17):
                side = math.isqrt(max(tokens - prefix, 0))
                if side > 0 and side * side == tokens - prefix:
                    return side * int(conv.kernel_size[0]), side * int(conv.kernel_size[1])
    return None


def default_preprocess(module: nn.Module) -> Preprocess:
    """ImageNet normalisation at the size the model implies (else 224), the whole image resized (no crop margin).

    A user's own model has no configuration to read: pass ``input_size``, ``mean``, ``std`` to
    :func:`vitlens.load_model` for what it was trained with.
    """
    size = default_input_size(module) or (DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE)
    return Preprocess(input_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", crop_pct=1.0)


def wrap(module, preprocess=None, class_names=None, info=None, attention_layers=None,
         readout=None) -> TorchAttentionModel:
    """The adapter of ``module`` (what the registry calls)."""
    return TorchAttentionModel(module, preprocess or default_preprocess(module), class_names, info,
                               attention_layers=attention_layers, readout=readout)


#: tried after the specific ViT families (their own attention modules first) and before the CNN catch-all:
#: a model with attention is an attention model even with a convolutional patch embedding
FAMILY = register_family(Family("torch-attention", "image", is_torch_attention_model, wrap, priority=80,
                                description="any model with torch.nn.MultiheadAttention self-attention",
                                options=frozenset({"attention_layers", "readout"})))

__all__ = ["FAMILY", "READOUTS", "Survey", "TorchAttentionModel", "default_input_size", "default_preprocess",
           "disable_fast_paths", "is_torch_attention_model", "wrap"]

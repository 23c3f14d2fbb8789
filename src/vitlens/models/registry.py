"""The adapter registry: model families register themselves, the loaders ask the registry.

A family is one adapter file. At import it calls :func:`register_family` with a predicate that
recognises its modules and a function that wraps one, and :func:`register_spec` for the spec prefix
it loads (``timm:``, ``hf:``, ...). Nothing here imports a family, so families import this module
freely; :mod:`vitlens.models.loading` (images) and :mod:`vitlens.text.loading` (text) import the
built-in families once, which fills the registry.

Families are tried in ascending ``priority`` (specific families first, the catch-all CNN adapter
last), so a model with attention is read as an attention model even when it also has convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from vitlens.errors import ModelError

#: the kinds of input a family explains
KINDS = ("image", "text")


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes
    ----------
    name : str
        Short name (``'timm'``, ``'hf'``, ``'cnn'``...), recorded as the adapter's ``family``.
    kind : {'image', 'text'}
    matches : callable
        ``matches(module) -> bool``: does this family read the module?
    wrap : callable
        ``wrap(module, preprocess=None, class_names=None, info=None, **options) -> adapter`` for
        image families; ``wrap(module, tokenizer=None, info=None, **options)`` for text families.
    priority : int
        Lower is tried first.
    description : str
        What users read in "unsupported model" messages.
    options : frozenset of str
        Keyword options only this family's ``wrap`` reads (``attention_layers``...): giving one of them
        selects the family whatever its predicate says.
    """

    name: str
    kind: str
    matches: Callable[[nn.Module], bool]
    wrap: Callable
    priority: int = 50
    description: str = ""
    options: frozenset = frozenset()


class NotThisFamily(ModelError):
    """Raised by an adapter's :meth:`~vitlens.models.base.ExplainableModel.prepare` when a closer look
    shows that its family does not read the module after all (the next matching family is tried)."""


@dataclass
class LoadedModule:
    """What a spec loader returns: the built module and what it knows about it (None: the family's default)."""

    module: nn.Module
    preprocess: object | None = None
    class_names: list | None = None
    weights: str | None = None
    #: the model's own tokenizer, for families that take text prompts (OpenCLIP's ``get_tokenizer(ARCH)``)
    tokenizer: object | None = None


_FAMILIES: dict[str, Family] = {}
_SPECS: dict[tuple[str, str], Callable] = {}


def register_family(family: Family) -> Family:
    """Add (or replace, by name and kind) a family."""
    if family.kind not in KINDS:
        raise ValueError(f"unknown family kind {family.kind!r}: expected one of {KINDS}")
    _FAMILIES[f"{family.kind}:{family.name}"] = family
    return family


def families(kind: str) -> list[Family]:
    """The registered families of one kind, in the order they are tried."""
    return sorted((f for f in _FAMILIES.values() if f.kind == kind), key=lambda f: (f.priority, f.name))


def find_family(module: nn.Module, kind: str) -> Family | None:
    """The first family of ``kind`` whose predicate accepts ``module``."""
    matching = candidates(module, kind)
    return matching[0] if matching else None


def candidates(module: nn.Module, kind: str, options=()) -> list[Family]:
    """The families that may read ``module``, in the order to try them: those accepting every option
    given, else those whose predicate accepts the module."""
    if options:
        return [f for f in families(kind) if set(options) <= f.options]
    return [f for f in families(kind) if f.matches(module)]


def register_spec(kind: str, prefix: str, loader: Callable) -> None:
    """``PREFIX:NAME`` specs of ``kind`` are loaded by ``loader(spec, name, ...)``.

    Image loaders take ``(spec, name, weights, num_classes)`` and return a :class:`LoadedModule`.
    """
    _SPECS[(kind, prefix)] = loader


def spec_loader(kind: str, prefix: str) -> Callable | None:
    return _SPECS.get((kind, prefix))


def spec_prefixes(kind: str) -> list[str]:
    return sorted(prefix for k, prefix in _SPECS if k == kind)


def descriptions(kind: str) -> str:
    """The families of one kind as users read them: "A, B and C"."""
    names = [f.description for f in families(kind) if f.description]
    return ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + (names[-1] if names else "")


__all__ = ["Family", "KINDS", "LoadedModule", "NotThisFamily", "candidates", "descriptions", "families", "find_family",
           "register_family", "register_spec", "spec_loader", "spec_prefixes"]

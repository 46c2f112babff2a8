"""Name-based registry of model architectures.

Configurations refer to models by a short name (``"preact_resnet18"``, ``"wrn34_10"``); architectures
register themselves with :func:`register_model` when their module is imported, which
``import advtrain.models`` does for every built-in architecture.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from advtrain.models.base import Classifier

__all__ = ["create_model", "list_models", "register_model"]

BuilderT = TypeVar("BuilderT", bound=Callable[..., Classifier])

_REGISTRY: dict[str, Callable[..., Classifier]] = {}


def register_model(name: str) -> Callable[[BuilderT], BuilderT]:
    """Decorator registering a :class:`Classifier` subclass or a factory function under ``name``.

    Args:
        name: Registry key; a non-empty string not registered yet.

    Returns:
        A decorator that registers its argument and returns it unchanged.

    Raises:
        ValueError: If ``name`` is empty or not a string (at once), or already registered (when the
            decorator is applied).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(builder: BuilderT) -> BuilderT:
        if name in _REGISTRY:
            taken_by = _REGISTRY[name]
            raise ValueError(
                f"model name {name!r} is already registered to "
                f"{getattr(taken_by, '__module__', '?')}.{getattr(taken_by, '__qualname__', repr(taken_by))}"
            )
        if not callable(builder):
            raise ValueError(f"register_model({name!r}) needs a class or function, got {builder!r}")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of every registered model.

    Returns:
        The registered names, sorted.
    """
    return sorted(_REGISTRY)


def _keyword_names(builder: Callable[..., Any]) -> set[str] | None:
    """Keyword arguments ``builder`` accepts, or ``None`` when it takes ``**kwargs`` (anything goes)."""
    accepted = set()
    for param in inspect.signature(builder).parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            accepted.add(param.name)
    return accepted


def create_model(name: str, **kwargs: Any) -> Classifier:
    """Builds the model registered under ``name``.

    Args:
        name: A registered model name (see :func:`list_models`).
        **kwargs: Keyword arguments forwarded to the registered class or factory, e.g.
            ``num_classes``, ``in_channels``, ``mean``, ``std``.

    Returns:
        A freshly initialised :class:`Classifier`.

    Raises:
        ValueError: If ``name`` is not registered; the message lists every registered name.
        TypeError: If a keyword is not accepted by the model (the message names the model, the
            offending keys and the accepted ones), or the factory does not return a
            :class:`Classifier`.
    """
    try:
        builder = _REGISTRY[name]
    except (KeyError, TypeError):
        # TypeError: an unhashable name is just as unknown as a misspelt one.
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None

    accepted = _keyword_names(builder)
    if accepted is not None:
        unexpected = sorted(set(kwargs) - accepted)
        if unexpected:
            raise TypeError(
                f"model {name!r} got unexpected keyword argument(s) {', '.join(map(repr, unexpected))}; "
                f"accepted keyword arguments: {', '.join(sorted(accepted))}"
            )

    model = builder(**kwargs)
    if not isinstance(model, Classifier):
        raise TypeError(f"model {name!r} was built as {type(model).__name__}, which is not a Classifier")
    return model


def model_keywords(name: str) -> set[str] | None:
    """Keyword arguments the model registered under ``name`` accepts (``None``: any).

    Raises:
        ValueError: If ``name`` is not registered; the message lists every registered name.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _keyword_names(_REGISTRY[name])

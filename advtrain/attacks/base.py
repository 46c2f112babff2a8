"""The attack interface: ``attack(model, inputs, labels) -> AttackResult``."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor, nn

from advtrain.attacks.registry import AttackSpec
from advtrain.engine.core import AttackCore
from advtrain.engine.modes import AttackMode, attack_context
from advtrain.engine.result import AttackResult
from advtrain.engine.tracking import autocast_dtype
from advtrain.threat.norms import as_eps_tensor, checks_budget_arguments


class Attack(ABC):
    """Base class of every attack.

    Subclasses take their own hyperparameters as keyword-only constructor arguments (canonical names ``norm``,
    ``eps``, ``steps``, ``step_size``, ``restarts``, ``targeted``) followed by ``**options``, which they hand to
    ``super().__init__``: the options below are declared here once, for every attack (:meth:`hyperparameters` lists an
    attack's own and these; LightningCLI and :func:`~advtrain.attacks.create_attack` accept both). They implement
    :meth:`run` on the shared attack core (:meth:`core`). Calling the attack puts the model in the attack's mode with
    frozen parameters and restores it afterwards.

    Args:
        mode: BatchNorm/dropout policy during the attack (``"eval"`` by default), see :class:`AttackMode`.
        seed: seeds the attack's own RNG (random starts) so that results are reproducible; ``None`` draws from
            torch's global RNG.
        autocast: run the model under ``"bf16"`` or ``"fp16"`` autocast; the perturbation, the steps and the norms
            stay in float32.
        compile: use the ``torch.compile``-d (fused) elementwise step; the eager step is its tested twin.
    """

    spec: AttackSpec
    targeted: bool = False
    #: Check the inputs and labels on every call. The training maximizers set it to ``False`` on the attacks they
    #: run, because :class:`~advtrain.training.AdversarialTraining` has already checked the batch on the host (each
    #: check reads values back from the device: a host sync per step). Leave it on for unchecked batches.
    checks: bool = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        checks_budget_arguments(cls)  # eps: a number, >= 0, <= 1 for L∞, parsed once in the constructor

    def __init__(
        self,
        *,
        autocast: Literal["bf16", "fp16"] | None = None,
        compile: bool = False,
        mode: Literal["eval", "train"] = "eval",
        seed: int | None = None,
    ) -> None:
        self.mode = AttackMode.parse(mode)
        self.seed = seed
        self.autocast = autocast
        self._autocast = autocast_dtype(autocast)
        self.compile = bool(compile)
        self._active_set = "shrink"

    @classmethod
    def hyperparameters(cls) -> tuple[str, ...]:
        """The keyword arguments the constructor accepts: the attack's own, then the shared options of
        :class:`Attack` when it forwards ``**options``."""
        params = inspect.signature(cls.__init__).parameters
        own = tuple(p for p, v in params.items() if p != "self" and v.kind is not inspect.Parameter.VAR_KEYWORD)
        if any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values()):
            own += tuple(p for p in inspect.signature(Attack.__init__).parameters if p != "self" and p not in own)
        return own

    def engine_options(self) -> dict:
        """The options of this call's :class:`~advtrain.engine.core.AttackCore` (autocast, compile, checks and the
        active-set mode), for attacks that run an engine routine such as :func:`~advtrain.engine.gradient_ascent`."""
        return {"autocast": self._autocast, "compile": self.compile, "checks": self.checks,
                "active_set": self._active_set}  # fmt: skip

    def core(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> AttackCore:
        """The :class:`~advtrain.engine.core.AttackCore` of one call, with this attack's autocast and compile
        options (it checks the gradient mode and, with :attr:`checks`, the inputs and labels) and the call's
        active-set mode."""
        return AttackCore(model, inputs, labels, targeted=self.targeted, **self.engine_options())

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        labels: Tensor,
        eps: float | Tensor | None = None,
        *,
        active_set: Literal["shrink", "mask"] = "shrink",
    ) -> AttackResult:
        """Attacks a batch.

        Args:
            model: maps [0, 1] inputs to logits.
            inputs: clean batch in [0, 1].
            labels: true labels (targets when the attack is targeted).
            eps: optional per-call budget (scalar or (B,)) overriding the configured one.
            active_set: ``"shrink"`` (finished samples leave the batch: the fastest on a CPU) or ``"mask"`` (fixed
                shapes, finished samples masked: the same results, the shape a CUDA graph needs), see
                :mod:`advtrain.engine.state`.

        Returns:
            The :class:`AttackResult`.
        """
        self._active_set = active_set  # checked by the call's AttackCore
        try:
            with attack_context(model, self.mode):
                return self.run(model, inputs, labels, eps=eps, generator=self.generator(inputs.device))
        finally:
            self._active_set = "shrink"

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The random generator of one call on ``device``: seeded afresh with ``seed`` (so every call draws the same
        numbers), or ``None`` (the global RNG) without a seed."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)

    @staticmethod
    def optional_eps(eps: float | None) -> float | None:
        """Validates the optional ε-ball budget of a minimal-norm attack: ``None`` (unbudgeted) or a float >= 0."""
        if eps is not None and eps < 0:
            raise ValueError(f"eps must be None or >= 0, got {eps}.")
        return None if eps is None else float(eps)

    def budget(self, eps: float | Tensor | None, inputs: Tensor) -> Tensor | None:
        """The per-sample budget of a call: the per-call ``eps`` if given, else the configured ``self.eps`` (if the
        attack has one), as a (B,) tensor; ``None`` for an unbudgeted minimal-norm attack."""
        value = getattr(self, "eps", None) if eps is None else eps
        return None if value is None else as_eps_tensor(value, inputs)

    @abstractmethod
    def run(
        self, model: nn.Module, inputs: Tensor, labels: Tensor, *, eps: float | Tensor | None, generator
    ) -> AttackResult:
        """Runs the attack on a model already in attack state."""

    def __repr__(self) -> str:
        params = type(self).hyperparameters()
        shown = []
        for name in params:
            value = getattr(self, name, None)
            shown.append(f"{name}={getattr(value, 'value', value)!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

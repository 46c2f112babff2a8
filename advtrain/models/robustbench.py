"""The RobustBench bridge: leaderboard models built by the ``robustbench`` package from a local weight file, and
RobustBench's WideResNet layout mapped onto advtrain's ``wide_resnet``.

Croce, Andriushchenko, Sehwag, Debenedetti, Flammarion, Chiang, Mittal and Hein, "RobustBench: a standardized
adversarial robustness benchmark", NeurIPS 2021 Datasets and Benchmarks. RobustBench keeps each entry's weights at
``<model_dir>/<dataset>/<threat_model>/<name>.pt`` and builds its architecture with
``robustbench.model_zoo.model_dicts[dataset][threat_model][name]["model"]()``; the models take [0, 1] inputs and
normalise inside, as advtrain's do.

:func:`load_robustbench` does what ``robustbench.utils.load_model`` does for a file that is already on disk, with
these deviations:

* Nothing is downloaded: a missing file is an error, and the architecture is built with outbound network
  connections refused (entries whose constructor fetches pretrained weights, e.g. ImageNet's ``Standard_R50``, are
  refused with one line instead of downloading).
* The file is read with ``torch.load(weights_only=True)`` through
  :func:`~advtrain.training.checkpoint.read_checkpoint` (RobustBench unpickles it whole); ``trust=True`` lifts it.
* Prefixes: RobustBench deletes ``module.`` and ``model.`` wherever they occur in a key (``key[len(substr):]`` when
  ``substr in key``) and adds ``model.`` back for most ImageNet entries, by a list of names. Here ``module.`` and
  ``model.`` are removed only as leading prefixes, and ``model.`` is added back when that is what makes the keys fit
  the architecture: the same result for every key layout RobustBench loads, without the name list.
* RobustBench loads a list of known entries with ``strict=False`` when the strict load fails on missing
  normalisation buffers (``mu``/``sigma``, ``mean``/``std``, ``normalize.mean``/``normalize.std``): their files do not
  hold them and the constructor's values are the right ones. Here any entry may miss exactly those buffers (the
  constructor's values are kept, and logged); every other key must fit exactly, so a file RobustBench would load
  with further unexpected keys ignored (``Diffenderfer2021Winning_*``'s ``scores``) is refused.
* Ensembles stored as several files (``gdrive_id`` a list, e.g. ``Chen2020Adversarial``) and the ``corruptions``
  threat models are not supported.
* robustbench's package ``__init__`` (1.1.1, and its current code) imports ``pkg_resources``, which setuptools 81
  removed, and ``autoattack``, the import name of AutoAttack installed from GitHub (the ``pyautoattack`` wheel
  installs ``pyautoattack``): with either missing, ``import robustbench`` fails although the model zoo needs neither.
  The zoo is then imported under a bare ``robustbench`` package (its ``__init__`` not run), which is removed from
  ``sys.modules`` again right after: a later ``import robustbench`` fails as it did before (the zoo's modules stay
  loaded, as a failed ``import robustbench`` leaves them too).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.metadata
import importlib.util
import ipaddress
import logging
import re
import socket
import sys
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from advtrain.errors import UserError
from advtrain.safe_load import read_checkpoint
from advtrain.threat.norms import Norm

__all__ = [
    "INSTALL_HINT",
    "RobustBenchEntry",
    "RobustBenchError",
    "RobustBenchMissingError",
    "default_eps",
    "describe_key_mismatch",
    "list_robustbench",
    "load_robustbench",
    "robustbench_entry",
    "robustbench_for_evaluation",
    "robustbench_layout",
    "robustbench_wrn_state_dict",
    "threat_model_name",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'advtrain[robustbench]'"

DATASETS = ("cifar10", "cifar100", "imagenet")
#: RobustBench's spelling of each threat norm (its ``ThreatModel`` values; L1 is RobustBench's name too).
_THREAT_OF_NORM = {Norm.LINF: "Linf", Norm.L2: "L2", Norm.L1: "L1"}
#: The budgets of the RobustBench leaderboards: L∞ 8/255, L2 0.5, L1 12 on CIFAR-10/100; L∞ 4/255 on ImageNet.
_EPS = {
    ("cifar10", "Linf"): 8 / 255,
    ("cifar10", "L2"): 0.5,
    ("cifar10", "L1"): 12.0,
    ("cifar100", "Linf"): 8 / 255,
    ("cifar100", "L2"): 0.5,
    ("cifar100", "L1"): 12.0,
    ("imagenet", "Linf"): 4 / 255,
}
#: Buffer names of the normalisation layers that RobustBench files may lack (the constructor sets them).
_NORMALISATION_BUFFERS = ("mu", "sigma", "mean", "std")
#: Entries whose file holds the weights under ``last`` (RobustBench's ``load_model`` picks them out by name).
_LAST_WRAPPED = re.compile(r"^(Kireev2021Effectiveness.*|Andriushchenko2020Understanding)$")


class RobustBenchError(UserError, ValueError):
    """A RobustBench model that cannot be loaded: an unknown name, an unsupported entry, or a file that does not fit."""


class RobustBenchMissingError(UserError, ImportError):
    """The optional ``robustbench`` package is not installed."""


def threat_model_name(value: str | Norm) -> str:
    """RobustBench's name of a threat norm, from any spelling :meth:`Norm.parse` accepts (``"linf"``, ``"LINF"``,
    ``"L2"``, ``"l1"``, ...).

    Raises:
        RobustBenchError: for a norm without a RobustBench threat model (L0) or an unknown name.
    """
    try:
        norm = Norm.parse(value)
    except ValueError:
        norm = None
    if norm not in _THREAT_OF_NORM:
        raise RobustBenchError(f"Unknown RobustBench threat model {value!r}; allowed: Linf, L2, L1 (any case).")
    return _THREAT_OF_NORM[norm]


def default_eps(dataset: str, threat_model: str | Norm) -> float:
    """The leaderboard budget of a dataset and threat model: L∞ 8/255, L2 0.5, L1 12 on CIFAR-10/100, L∞ 4/255 on
    ImageNet.

    Raises:
        RobustBenchError: for a pair without a leaderboard (ImageNet L2 or L1).
    """
    threat = threat_model_name(threat_model)
    try:
        return _EPS[(dataset, threat)]
    except KeyError:
        known = ", ".join(f"{d}/{t}" for d, t in _EPS)
        raise RobustBenchError(
            f"RobustBench has no {dataset}/{threat} leaderboard (known: {known}): pass --eps."
        ) from None


@dataclass(frozen=True)
class RobustBenchEntry:
    """One model of the RobustBench zoo.

    Attributes:
        name: its name in the zoo (``"Carmon2019Unlabeled"``).
        dataset: ``"cifar10"``, ``"cifar100"`` or ``"imagenet"``.
        threat_model: ``"Linf"``, ``"L2"`` or ``"L1"``.
    """

    name: str
    dataset: str
    threat_model: str

    @property
    def norm(self) -> str:
        """advtrain's name of the threat norm (``"linf"``, ``"l2"``, ``"l1"``)."""
        return Norm.parse(self.threat_model).value

    @property
    def eps(self) -> float:
        """The leaderboard budget (:func:`default_eps`)."""
        return default_eps(self.dataset, self.threat_model)

    def as_dict(self) -> dict[str, Any]:
        """The entry and the installed robustbench version, for reports."""
        return {"model": self.name, "dataset": self.dataset, "threat_model": self.threat_model,
                "version": _robustbench_version()}  # fmt: skip

    def load(self, path: str | Path, *, trust: bool = False) -> nn.Module:
        """The model with the weights of ``path``: see :func:`load_robustbench`."""
        return _load_entry(self, path, trust=trust)


# ----------------------------------------------------------------------------------------------- the model zoo


_ZOO: Any = None


def _robustbench_version() -> str | None:
    try:
        return importlib.metadata.version("robustbench")
    except importlib.metadata.PackageNotFoundError:
        return None


def _model_zoo() -> Any:
    """``robustbench.model_zoo.model_dicts`` (imported once).

    Raises:
        RobustBenchMissingError: when robustbench (or one of its model zoo's dependencies) is not installed.
    """
    global _ZOO
    if _ZOO is None:
        try:
            zoo = importlib.import_module("robustbench.model_zoo")
        except ModuleNotFoundError as err:
            if (err.name or "robustbench").split(".")[0] == "robustbench" or sys.modules.get("robustbench", 0) is None:
                raise RobustBenchMissingError(
                    f"Loading RobustBench models needs the robustbench package: {INSTALL_HINT}"
                ) from None
            try:  # a dependency of the package __init__ only (pkg_resources, autoattack): see the module docstring
                with bare_robustbench_package():
                    zoo = importlib.import_module("robustbench.model_zoo")
            except ModuleNotFoundError as again:
                missing = (again.name or "?").split(".")[0]
                raise RobustBenchMissingError(
                    f"robustbench is installed but its dependency {missing!r} is not: {INSTALL_HINT} (or pip install "
                    f"{missing})"
                ) from None
        _ZOO = zoo.model_dicts
    return _ZOO


@contextlib.contextmanager
def bare_robustbench_package() -> Iterator[None]:
    """While inside, ``robustbench`` is its bare package in ``sys.modules`` (``__path__`` set, ``__init__`` not
    run), so that its submodules (``robustbench.model_zoo``, ``robustbench.utils``) import where the package
    ``__init__`` cannot (see the module docstring); removed again on exit. Does nothing when ``robustbench`` is
    already imported."""
    if sys.modules.get("robustbench") is not None:
        yield
        return
    spec = importlib.util.find_spec("robustbench")
    if spec is None:
        raise RobustBenchMissingError(f"Loading RobustBench models needs the robustbench package: {INSTALL_HINT}")
    package = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not executed
    sys.modules["robustbench"] = package
    try:
        yield
    finally:
        if sys.modules.get("robustbench") is package:
            del sys.modules["robustbench"]


def _zoo_models(dataset: str, threat_model: str) -> Mapping[str, dict[str, Any]]:
    """The zoo's entries for one dataset and threat model, keyed by name (empty when RobustBench has none)."""
    zoo = _model_zoo()
    for bench, threats in zoo.items():
        if bench.value == dataset:
            for threat, models in threats.items():
                if threat.value == threat_model:
                    return models
    return {}


def list_robustbench(dataset: str = "cifar10", threat_model: str = "Linf") -> list[str]:
    """The RobustBench model names of a dataset and threat model, in the zoo's order.

    Raises:
        RobustBenchMissingError: without the robustbench package.
    """
    return list(_zoo_models(_dataset_name(dataset), threat_model_name(threat_model)))


def _dataset_name(dataset: str) -> str:
    key = str(dataset).strip().lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise RobustBenchError(f"Unknown RobustBench dataset {dataset!r}; allowed: {', '.join(DATASETS)}.")
    return key


def robustbench_layout(path: str | Path | None) -> tuple[str | None, str | None]:
    """The dataset and threat model that RobustBench's layout ``<model_dir>/<dataset>/<threat_model>/<name>.pt``
    gives a path (``None`` where the folder names are not those)."""
    if path is None:
        return None, None
    parts = Path(path).parts
    threat = dataset = None
    if len(parts) >= 2:
        with contextlib.suppress(RobustBenchError):
            threat = threat_model_name(parts[-2])
    if len(parts) >= 3 and threat is not None:
        with contextlib.suppress(RobustBenchError):
            dataset = _dataset_name(parts[-3])
    return dataset, threat


def robustbench_entry(
    name: str, path: str | Path | None = None, dataset: str | None = None, threat_model: str | None = None
) -> RobustBenchEntry:
    """Finds a RobustBench model. The dataset and threat model default to what the weight file's place in
    RobustBench's layout (``<model_dir>/<dataset>/<threat_model>/<name>.pt``) says, else CIFAR-10 and L∞.

    Args:
        name: the model's name in the zoo, as the leaderboard shows it (``"Wong2020Fast"``).
        path: the local weight file (only its folders are read here).
        dataset: ``"cifar10"``, ``"cifar100"`` or ``"imagenet"``.
        threat_model: ``"Linf"``, ``"L2"`` or ``"L1"``, any case.

    Returns:
        The entry.

    Raises:
        RobustBenchMissingError: without the robustbench package.
        RobustBenchError: for an unknown name (the message lists close names of that dataset and threat model, and
            where else the name exists) or an entry advtrain cannot load.
    """
    from_path = robustbench_layout(path)
    dataset = _dataset_name(dataset) if dataset is not None else from_path[0] or "cifar10"
    threat = threat_model_name(threat_model) if threat_model is not None else from_path[1] or "Linf"
    models = _zoo_models(dataset, threat)
    if name not in models:
        raise RobustBenchError(_unknown_name(name, dataset, threat, list(models)))
    if isinstance(models[name].get("gdrive_id"), (list, tuple)):
        raise RobustBenchError(
            f"RobustBench's {name} ({dataset}/{threat}) is an ensemble stored as {len(models[name]['gdrive_id'])} "
            "files, which advtrain does not load."
        )
    return RobustBenchEntry(name, dataset, threat)


def _unknown_name(name: str, dataset: str, threat: str, names: list[str]) -> str:
    where = f"{dataset}/{threat}"
    if not names:
        return f"RobustBench has no {where} models (--robustbench {name})."
    by_lower = {n.lower(): n for n in names}
    close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)]
    hint = f"close names: {', '.join(close)}" if close else f"e.g. {', '.join(names[:5])}"
    elsewhere = []
    for other_dataset in DATASETS:
        for other_threat in ("Linf", "L2", "L1"):
            if (other_dataset, other_threat) != (dataset, threat) and name in _zoo_models(other_dataset, other_threat):
                elsewhere.append(f"{other_dataset}/{other_threat}")
    also = ""
    if elsewhere:
        also = f"; {name} exists under {', '.join(elsewhere)} (--robustbench_dataset/--robustbench_threat)"
    return f"Unknown RobustBench model {name!r} for {where} ({len(names)} models); {hint}{also}."


# ----------------------------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _no_downloads(refused: list[str]) -> Iterator[None]:
    """Refuses outbound network connections (IPv4/IPv6 to a non-loopback address) while RobustBench builds an
    architecture, so that a constructor asking for pretrained weights fails instead of downloading them; each refused
    address is appended to ``refused``."""
    original = socket.socket.connect, socket.socket.connect_ex

    def _outbound(sock: socket.socket, address: Any) -> bool:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        try:
            return not ipaddress.ip_address(address[0]).is_loopback
        except ValueError:  # a host name, resolved inside connect: refuse it unless it is localhost
            return address[0] != "localhost"

    def connect(sock: socket.socket, address: Any) -> None:
        if _outbound(sock, address):
            refused.append(str(address[0]))
            raise ConnectionRefusedError(f"advtrain refuses downloads while building a RobustBench model ({address})")
        return original[0](sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        if _outbound(sock, address):
            refused.append(str(address[0]))
            return 111  # ECONNREFUSED
        return original[1](sock, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex = original


def _build(entry: RobustBenchEntry) -> nn.Module:
    builder = _zoo_models(entry.dataset, entry.threat_model)[entry.name]["model"]
    refused: list[str] = []
    try:
        with _no_downloads(refused):
            model = builder()
    except Exception as err:  # noqa: BLE001 - any failure of third-party code becomes one line
        if refused:
            raise RobustBenchError(
                f"RobustBench builds {entry.name} ({entry.dataset}/{entry.threat_model}) by downloading pretrained "
                f"weights ({refused[0]}); advtrain never downloads weights, so this entry is not supported."
            ) from None
        first = str(err).splitlines()[0] if str(err) else ""
        raise RobustBenchError(
            f"robustbench could not build {entry.name} ({entry.dataset}/{entry.threat_model}): "
            f"{type(err).__name__}: {first}"
        ) from None
    if not isinstance(model, nn.Module):
        raise RobustBenchError(f"robustbench built {entry.name} as a {type(model).__name__}, not a torch module.")
    return model


def _unwrap(checkpoint: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The state dict inside a RobustBench file: ``last`` for the entries RobustBench reads it from, then
    ``state_dict`` when present, else the file itself."""
    if _LAST_WRAPPED.match(name) and isinstance(checkpoint.get("last"), Mapping):
        checkpoint = checkpoint["last"]
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise RobustBenchError(f"the file's state_dict is a {type(state).__name__}, not a mapping of tensors.")
    return dict(state)


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _tolerated_missing(model: nn.Module) -> set[str]:
    """The normalisation buffers of ``model`` that a weight file may lack (its constructor sets them)."""
    parameters = {name for name, _ in model.named_parameters()}
    return {
        name
        for name, _ in model.named_buffers()
        if name.rsplit(".", 1)[-1] in _NORMALISATION_BUFFERS and name not in parameters
    }


def _fits(expected: set[str], given: Mapping[str, Any], tolerated: set[str]) -> bool:
    return set(given) <= expected and expected - set(given) <= tolerated


def describe_key_mismatch(
    expected: Mapping[str, Any], given: Mapping[str, Any], optional: Collection[str] = frozenset()
) -> str:
    """``"3 missing (e.g. fc.weight), 1 unexpected keys (e.g. conv1.scores)"``: the keys of a state dict ``given``
    that a model (its ``expected`` state dict) needs but does not find (``optional`` ones aside) or does not know,
    counted, with the first of each."""
    missing = [k for k in expected if k not in given and k not in optional]
    unexpected = [k for k in given if k not in expected]
    missing_text = f"{len(missing)} missing" + (f" (e.g. {missing[0]})" if missing else "")
    unexpected_text = f"{len(unexpected)} unexpected keys" + (f" (e.g. {unexpected[0]})" if unexpected else "")
    return f"{missing_text}, {unexpected_text}"


def load_robustbench(
    name: str,
    path: str | Path,
    dataset: str | None = None,
    threat_model: str | None = None,
    *,
    trust: bool = False,
) -> nn.Module:
    """A RobustBench model with the weights of a local file, in eval mode, taking [0, 1] inputs.

    The architecture comes from the ``robustbench`` package (``model_dicts[dataset][threat_model][name]["model"]()``,
    built with outbound connections refused), the weights from ``path`` only: nothing is downloaded. Deviations from
    ``robustbench.utils.load_model``: see the module docstring.

    Example::

        model = load_robustbench("Wong2020Fast", "models/cifar10/Linf/Wong2020Fast.pt")

    Args:
        name: the model's name in the zoo, as the leaderboard shows it.
        path: the weight file the leaderboard links (any place; RobustBench's own layout
            ``<model_dir>/<dataset>/<threat_model>/<name>.pt`` also gives the dataset and threat model).
        dataset: ``"cifar10"``, ``"cifar100"`` or ``"imagenet"`` (default: from the path's layout, else
            ``"cifar10"``).
        threat_model: ``"Linf"``, ``"L2"`` or ``"L1"``, any case (default: from the path's layout, else ``"Linf"``).
        trust: read a file that needs code execution to unpickle (only for files from a source you trust).

    Returns:
        The model, in eval mode.

    Raises:
        RobustBenchMissingError: without the robustbench package (``pip install 'advtrain[robustbench]'``).
        RobustBenchError: an unknown name, an unsupported entry, or weights that do not fit the architecture.
        CheckpointNotFoundError, CheckpointError: no file at ``path``, or a file that cannot be read safely.
    """
    entry = robustbench_entry(name, path, dataset, threat_model)
    return _load_entry(entry, path, trust=trust)


def _load_entry(entry: RobustBenchEntry, path: str | Path, *, trust: bool = False) -> nn.Module:
    checkpoint = read_checkpoint(path, trust=trust)
    model = _build(entry)
    state = _strip(_strip(_unwrap(checkpoint, entry.name), "module."), "model.")
    expected = model.state_dict()
    tolerated = _tolerated_missing(model)
    candidates = [state, {f"model.{k}": v for k, v in state.items()}]
    chosen = next((c for c in candidates if _fits(set(expected), c, tolerated)), None)
    if chosen is None:
        raise RobustBenchError(
            f"The weights in {path} do not fit RobustBench's {entry.name} ({entry.dataset}/{entry.threat_model}) "
            f"architecture ({describe_key_mismatch(expected, state, tolerated)}): is it the file the leaderboard "
            "links for this entry?"
        )
    kept = sorted(set(expected) - set(chosen))
    try:
        model.load_state_dict(chosen, strict=not kept)
    except RuntimeError as err:  # shapes: "size mismatch for fc.weight: copying a param with shape ..."
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise RobustBenchError(
            f"The weights in {path} do not fit RobustBench's {entry.name} ({entry.dataset}/{entry.threat_model}) "
            f"architecture: {detail}"
        ) from None
    if kept:
        log.info("%s: %s not in %s; kept the architecture's own normalisation (as RobustBench does).", entry.name,
                 ", ".join(kept), path)  # fmt: skip
    return model.eval()


def robustbench_for_evaluation(
    name: str,
    path: str | Path | None,
    dataset: str | None = None,
    threat_model: str | None = None,
    *,
    norm: str | None = None,
    data: Any = None,
    trust: bool = False,
) -> tuple[RobustBenchEntry, nn.Module]:
    """``evaluate --robustbench``: the entry (its threat model: ``threat_model``, else the file's layout, else
    ``norm``, else L∞) and its model with the weights of ``path``, after checking that ``data`` (an advtrain
    datamodule) is the model's dataset.

    Raises:
        InvalidConfigError: without a weight file, or for a datamodule of another dataset.
        RobustBenchMissingError, RobustBenchError, CheckpointError: as :func:`load_robustbench`.
    """
    from advtrain.data import DATAMODULES
    from advtrain.errors import InvalidConfigError

    if path is None:
        raise InvalidConfigError(
            f"evaluate --robustbench {name} needs --ckpt_path: the local weight file the leaderboard links (advtrain "
            "never downloads weights)."
        )
    entry = robustbench_entry(name, path, dataset, threat_model or robustbench_layout(path)[1] or norm)
    data_name = getattr(data, "name", None)
    if data_name in DATAMODULES and data_name != entry.dataset and entry.dataset not in DATAMODULES:
        raise InvalidConfigError(
            f"evaluate: --robustbench {name} is a {entry.dataset} model and advtrain has no {entry.dataset} "
            "datamodule: pass yours with --data (an advtrain.data.AdvDataModule yielding unnormalised [0, 1] images)."
        )
    if data_name in DATAMODULES and data_name != entry.dataset:
        raise InvalidConfigError(
            f"evaluate: --robustbench {name} is a {entry.dataset} model, but the data is {type(data).__name__} "
            f"({data_name}): drop --data (the model's dataset is the default) or pass a {entry.dataset} datamodule."
        )
    return entry, entry.load(path, trust=trust)


# ----------------------------------------------------------------------------------------------- WRN layout map

#: RobustBench's WideResNet (``robustbench.model_zoo.architectures.wide_resnet``, from the TRADES code) → advtrain's
#: :class:`~advtrain.models.WideResNet`: same layers, other names.
_WRN_RULES = (
    (re.compile(r"^conv1\."), "first."),
    (re.compile(r"^(block\d)\.layer\.(\d+)\.convShortcut\."), r"\1.\2.shortcut."),
    (re.compile(r"^(block\d)\.layer\.(\d+)\.(bn1|conv1|bn2|conv2)\."), r"\1.\2.\3."),
    (re.compile(r"^bn1\."), "bn."),
    (re.compile(r"^fc\."), "linear."),
)


def robustbench_wrn_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """A state dict of RobustBench's WideResNet (``conv1``, ``block1.layer.N.*``, ``convShortcut``, ``bn1``,
    ``fc``) renamed for advtrain's ``wide_resnet`` (``first``, ``block1.N.*``, ``shortcut``, ``bn``, ``linear``);
    ``None`` when ``state`` is not in that layout.

    Both compute the same function (pre-activation blocks whose projection shortcut takes the pre-activated input,
    final BN-ReLU, 8x8 average pooling on 32x32 inputs, which is advtrain's global average pooling there). The keys of
    ``sub_block1``, a block that RobustBench builds for the TRADES-era entries (``sub_block1=True``) but never calls
    in ``forward``, are dropped. Other keys (``mean``/``std``) pass unchanged; whether the result fits a given model
    exactly is the loader's check.
    """
    if not any(k.startswith("block1.layer.") for k in state):
        return None
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("sub_block1."):
            continue
        for pattern, replacement in _WRN_RULES:
            if pattern.match(key):
                key = pattern.sub(replacement, key, count=1)
                break
        mapped[key] = value
    return mapped

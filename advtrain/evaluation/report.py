"""The evaluation report: numbers from the gathered records, ``report.json``/``report.md`` and PNG plots."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from advtrain.evaluation.masking import MaskingCheck, run_checks, within

log = logging.getLogger(__name__)


def eps_key(eps: float) -> str:
    """The text form of an ε in reports and logged keys, e.g. ``0.3`` or ``0.03137``."""
    return f"{eps:.4g}"


def eps_fraction(eps: float) -> str | None:
    """``"8/255"`` for an ε in (0, 1) that is k/255 (to 1e-6 of a pixel level), else ``None``: the form papers and
    leaderboards give L∞ budgets in."""
    levels = eps * 255
    k = round(levels)
    return f"{k}/255" if 0 < eps < 1 and abs(levels - k) < 1e-6 else None


#: RobustBench's spelling of each norm, the ``threat_model`` of a report.
_THREAT_MODEL = {"linf": "Linf", "l2": "L2", "l1": "L1", "l0": "L0"}


def sample_selection(index: Tensor, split: str | None = None) -> dict[str, Any]:
    """Which samples an evaluation used: the split, the first position, the count, whether they are the ``count``
    consecutive positions from the first (RobustBench's "first n test points"), and the SHA-256 of the sorted
    positions written as decimal numbers joined by commas (``hashlib.sha256(b"0,1,2").hexdigest()`` for the first
    three), which any language reproduces."""
    positions = sorted(int(i) for i in index.flatten().tolist())
    first = positions[0] if positions else None
    contiguous = bool(positions) and positions == list(range(first, first + len(positions)))
    digest = hashlib.sha256(",".join(map(str, positions)).encode()).hexdigest()
    return {"split": split, "first": first, "count": len(positions), "contiguous": contiguous, "sha256": digest}


def software_versions() -> dict[str, str | None]:
    """The versions a result depends on: advtrain, torch, Python and, when installed, robustbench."""
    import importlib.metadata

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    out = {"advtrain": version("advtrain"), "torch": torch.__version__, "python": platform.python_version()}
    robustbench = version("robustbench")
    if robustbench is not None:
        out["robustbench"] = robustbench
    return out


def device_name(device: torch.device | str) -> str:
    """The hardware behind a device: the GPU's name for CUDA, the processor (or machine type) for the CPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file (read in 1 MiB chunks), as ``sha256sum`` prints it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_metadata(
    *,
    checkpoint: str | Path | None,
    split: str,
    dataset: str,
    device: torch.device | str,
    suite: str | None,
    seed: int,
    robustbench: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``report.json`` records about a run beyond its numbers (which add the samples, threat model, ε, attack
    configurations and versions): the checkpoint and its SHA-256, the split and datamodule, the device and its
    hardware, the suite, the seed and the RobustBench entry, so that two reports can be compared
    (:func:`compare_reports`) and a result reproduced."""
    meta = {"checkpoint": None if checkpoint is None else str(checkpoint),
            "checkpoint_sha256": None if checkpoint is None else file_sha256(checkpoint), "split": split,
            "dataset": dataset, "device": str(device), "device_name": device_name(device), "suite": suite,
            "seed": seed}  # fmt: skip
    if robustbench is not None:
        meta["robustbench"] = dict(robustbench)
    return meta


def _median_with_failures(values: Tensor) -> float:
    """Lower median, failures being +inf (seed 001's convention); NaN for no sample."""
    if values.numel() == 0:
        return math.nan
    return float(values.sort().values[(values.numel() - 1) // 2])


def _mean(values: Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


@dataclass
class RobustnessReport:
    """The result of an evaluation. :meth:`as_dict` is what ``report.json`` holds.

    Accuracies are fractions of all evaluated samples; a sample counts as robust when it is classified correctly
    both clean and at every verified adversarial point (RobustBench's convention). "All" is, per sample, the worst
    case over every attack and every ε up to the one reported: a verified adversarial example of norm r breaks the
    sample at every ε ≥ r.

    Attributes:
        data: the gathered records (fields: :data:`advtrain.evaluation.records.RECORD`).
        summary: the numbers, as in ``report.json``.
        checks: the gradient-masking checks.
        interpretability: the interpretability scores and gallery
            (:class:`~advtrain.evaluation.interpretability.InterpretabilityResult`) of an evaluation run with
            ``interpretability=True``, else ``None``.
    """

    data: dict[str, Tensor]
    summary: dict[str, Any]
    checks: list[MaskingCheck] = field(default_factory=list)
    interpretability: Any = None

    def as_dict(self) -> dict[str, Any]:
        return self.summary

    def attach_interpretability(self, result: Any) -> None:
        """Adds an evaluation's interpretability result: its numbers go to ``summary["interpretability"]``."""
        self.interpretability = result
        self.summary["interpretability"] = result.summary()

    @property
    def fired(self) -> list[str]:
        """Names of the gradient-masking checks that fired."""
        return [c.name for c in self.checks if c.fired]

    def log_warnings(self) -> None:
        """Logs a warning per fired check and per attack defect (rank 0 only, under DDP)."""
        from advtrain.evaluation.sampling import dist_info

        if dist_info()[0] != 0:
            return
        for check in self.checks:
            if check.fired:
                log.warning("Gradient-masking check %s fired: %s. %s", check.name, check.detail, check.advice)
        for defect in self.summary["defects"]:
            log.warning("%s", defect)

    def scalars(self, prefix: str = "robust") -> dict[str, float]:
        """Flat ``{key: value}`` for a Lightning logger: accuracies per attack and ε, the worst case, success rates,
        norms, ρ, pass counts, times and the masking flags."""
        s = self.summary
        out = {f"{prefix}/clean_acc": s["clean_accuracy"], f"{prefix}/All/acc": s["robust_accuracy_all"]}
        for key, value in s["robust_accuracy_all_by_eps"].items():
            out[f"{prefix}/All/acc@{key}"] = value
        for name, a in s["attacks"].items():
            out[f"{prefix}/{name}/acc"] = a["robust_accuracy"]
            for key, value in a["robust_accuracy_by_eps"].items():
                out[f"{prefix}/{name}/acc@{key}"] = value
            for stat in ("success_rate", "mean_norm", "median_norm", "rho_mean", "rho_max", "forward_passes",
                         "backward_passes", "seconds", "false_claims"):  # fmt: skip
                out[f"{prefix}/{name}/{stat}"] = float(a[stat])
        for check in self.checks:
            out[f"{prefix}/masking/{check.name}"] = float(check.fired)
        if "interpretability" in s:
            from advtrain.evaluation.interpretability import interpretability_scalars

            out.update(interpretability_scalars(s["interpretability"], prefix))
        out[f"{prefix}/time_s"] = s["wall_time_s"]
        return out

    def curves(self) -> dict[str, tuple[list[float], list[float]]]:
        """Accuracy versus ε per attack and for ``"All"``, each starting at ε = 0 with the clean accuracy."""
        s = self.summary
        grid = s["eps_grid"]
        out = {}
        for name, a in [*s["attacks"].items(), ("All", {"robust_accuracy_by_eps": s["robust_accuracy_all_by_eps"]})]:
            out[name] = ([0.0, *grid], [s["clean_accuracy"], *(a["robust_accuracy_by_eps"][eps_key(e)] for e in grid)])
        return out


def robust_under_all(data: Mapping[str, Tensor], grid: Sequence[float]) -> Tensor:
    """(N, G): per sample and ε, whether it is robust under every attack of the records ("All"): correctly
    classified, no verified adversarial example of norm ≤ ε from any attack at any ε, and robust in every attack's
    ``robust`` record at that ε."""
    n = int(data["index"].numel())
    best = data["norms"].flatten(1).amin(1) if n else torch.zeros(0)
    columns = [data["correct"] & ~within(best, e) & data["robust"][:, :, g].all(1) for g, e in enumerate(grid)]
    return torch.stack(columns, 1) if columns else data["correct"].new_zeros((n, 0))


def summarize(
    data: dict[str, Tensor],
    attacks: Sequence,
    grid: Sequence[float],
    *,
    norm: str,
    eps: float,
    cascade: bool,
    tolerance: float = 0.01,
    seconds: float = 0.0,
    meta: Mapping[str, Any] | None = None,
    fusion: int | None = None,
) -> RobustnessReport:
    """Computes the report from the gathered records (the fields of :data:`advtrain.evaluation.records.RECORD`).

    Per attack (:func:`_attack_summary`): robust accuracy at each ε; success rate over the correctly classified samples
    it attacked (at the main ε for budgeted attacks); claimed, verified and falsely claimed successes (over all ε);
    mean norm over its successes and median norm over the samples it attacked with failures as +inf; ρ = ‖δ‖/‖x‖ mean
    and worst case (largest) over its successes; pass counts and time. ``fusion`` is the max fused batch of a fused
    run (``None``: not fused), reported as ``fused`` and ``max_fused_batch``.
    """
    n = int(data["index"].numel())
    total = max(n, 1)
    standing = robust_under_all(data, grid)
    all_by_eps = {eps_key(e): float(standing[:, g].sum()) / total for g, e in enumerate(grid)}
    attacks_out = {entry.name: _attack_summary(data, a, entry, grid, eps, total) for a, entry in enumerate(attacks)}
    defects = [
        f"Attack {name} claimed {a['false_claims']} successes that did not hold on re-check (clipped to the ball and "
        "box, fresh forward pass): an attack defect; they were counted as failures."
        for name, a in attacks_out.items()
        if a["false_claims"]
    ]
    curves = _masking_curves(data, attacks, grid, cascade, all_by_eps, attacks_out, total)
    checks = run_checks(
        data, [e.name for e in attacks], [e.role for e in attacks], [e.minimal and e.unbounded for e in attacks],
        list(grid), curves, tolerance,
    )  # fmt: skip
    summary = {
        **(dict(meta) if meta else {}),
        "samples": n,
        "sample_selection": sample_selection(data["index"], (meta or {}).get("split")),
        "norm": norm,
        "threat_model": _THREAT_MODEL.get(norm, norm),
        "eps": eps,
        "eps_fraction": eps_fraction(eps),
        "eps_grid": list(grid),
        "cascade": cascade,
        "fused": fusion is not None,
        "max_fused_batch": fusion,
        "clean_accuracy": float(data["correct"].sum()) / total,
        "robust_accuracy_all": all_by_eps[eps_key(eps)],
        "robust_accuracy_all_by_eps": all_by_eps,
        "attacks": attacks_out,
        "masking_checks": [c.as_dict() for c in checks],
        "defects": defects,
        "wall_time_s": round(seconds, 3),
        "versions": software_versions(),
    }
    return RobustnessReport(data=data, summary=summary, checks=checks)


def _masking_curves(data, attacks, grid, cascade: bool, all_by_eps, attacks_out, total: int) -> dict[str, list[float]]:
    """The curves of the "success grows with ε" check: the worst case, the worst case over the gradient attacks only
    (a black-box attack must not hide flat gradient-attack curves), and each budgeted attack alone when it ran on
    every sample (in the cascade its curve is cumulative, hence monotone by construction)."""
    curves = {"All": list(all_by_eps.values())}
    white = [a for a, e in enumerate(attacks) if e.role != "black_box"]
    if white and len(white) < len(attacks) and data["index"].numel():
        white_best = data["norms"][:, white].flatten(1).amin(1)
        curves["white-box attacks"] = [float((data["correct"] & ~within(white_best, e)).sum()) / total for e in grid]
    for entry in attacks:
        if not entry.minimal and not cascade:
            curves[entry.name] = list(attacks_out[entry.name]["robust_accuracy_by_eps"].values())
    return curves


def _attack_summary(data: Mapping[str, Tensor], a: int, entry, grid, eps: float, total: int) -> dict[str, Any]:
    """The report's entry of the attack at position ``a`` (see :func:`summarize`)."""
    col = 0 if entry.minimal else list(grid).index(eps)
    attacked = data["attacked"][:, a, col]
    fooled = data["fooled"][:, a, col] & attacked
    norms = data["norms"][:, a, col]
    every = slice(0, 1) if entry.minimal else slice(None)
    ran = data["attacked"][:, a, every]
    claimed, verified = data["claimed"][:, a, every] & ran, data["fooled"][:, a, every] & ran
    rho = norms[fooled] / data["x_norm"][fooled].clamp_min(1e-12)
    by_eps = {eps_key(e): float(data["robust"][:, a, g].sum()) / total for g, e in enumerate(grid)}
    n_attacked = int(attacked.sum())
    return {
        "config": entry.config,
        "kind": "minimal" if entry.minimal else "budgeted",
        "role": entry.role,
        "robust_accuracy": by_eps[eps_key(eps)],
        "robust_accuracy_by_eps": by_eps,
        "attacked": n_attacked,
        "attacked_by_eps": {eps_key(e): int(data["attacked"][:, a, g].sum()) for g, e in enumerate(grid)},
        "success_rate": float(fooled.sum()) / n_attacked if n_attacked else math.nan,
        "claimed_successes": int(claimed.sum()),
        "verified_successes": int(verified.sum()),
        "false_claims": int((claimed & ~verified).sum()),
        "mean_norm": _mean(norms[fooled]),
        "median_norm": _median_with_failures(torch.where(fooled, norms, math.inf)[attacked]),
        "rho_mean": _mean(rho),
        "rho_max": float(rho.max()) if rho.numel() else math.nan,
        "forward_passes": int(data["forward_passes"][a]),
        "backward_passes": int(data["backward_passes"][a]),
        "seconds": round(float(data["seconds"][a]), 3),
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _pct(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def _num(value: float) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.4g}"


def write_report(
    report: RobustnessReport, output: str | Path, meta: Mapping[str, Any] | None = None, plots: bool = True
) -> Path:
    """Writes ``report.json``, ``report.md`` and (with ``plots``) ``accuracy_vs_eps.png`` and ``minimal_norms.png``
    into ``output``, and the gallery PNGs of an evaluation with interpretability; returns the folder."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    data = {**(dict(meta) if meta else {}), **report.as_dict()}
    if report.interpretability is not None:
        from advtrain.evaluation.gallery import write_galleries

        files = write_galleries(report.interpretability, out) if plots else []
        data["interpretability"] = {**data["interpretability"], "gallery_files": [f.name for f in files]}
    (out / "report.json").write_text(json.dumps(_json_safe(data), indent=2))
    grid = data["eps_grid"]
    lines = ["# advtrain robustness report", "", *_header(data, meta or {})]
    lines += [
        f"- ε grid: {', '.join(map(eps_key, grid))}; cascade: {data['cascade']}; fused: {data.get('fused', False)}; "
        f"wall time: {data['wall_time_s']:.1f} s",
        "",
        "## Robust accuracy per ε",
        "",
        "| attack | " + " | ".join(f"ε={eps_key(e)}" for e in grid) + " |",
        "|---|" + "---|" * len(grid),
    ]
    for name, a in data["attacks"].items():
        lines.append(f"| {name} | " + " | ".join(_pct(a["robust_accuracy_by_eps"][eps_key(e)]) for e in grid) + " |")
    lines.append("| **All** | " + " | ".join(_pct(data["robust_accuracy_all_by_eps"][eps_key(e)]) for e in grid) + " |")
    lines += [
        "",
        "## Attacks",
        "",
        "| attack | kind | success rate | verified | false claims | mean norm | median norm | ρ mean | ρ max | fwd "
        "| bwd | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in data["attacks"].items():
        lines.append(
            f"| {name} | {a['kind']} | {_pct(a['success_rate'])} | {a['verified_successes']} | {a['false_claims']} | "
            f"{_num(a['mean_norm'])} | {_num(a['median_norm'])} | {_num(a['rho_mean'])} | {_num(a['rho_max'])} | "
            f"{a['forward_passes']} | {a['backward_passes']} | {a['seconds']:.1f} |"
        )
    lines += ["", "## Gradient-masking checks", ""]
    for check in data["masking_checks"]:
        mark = "**FIRED**" if check["fired"] else "ok"
        lines.append(
            f"- {check['name']}: {mark} — {check['detail']}." + (f" {check['advice']}" if check["fired"] else "")
        )
    if data.get("escalation"):
        esc = data["escalation"]
        lines += ["", "## Escalation", "",
                  f"Triggered by {', '.join(esc['triggered_by'])}: the samples still robust were attacked again. Worst "
                  f"case {_pct(esc['robust_accuracy_before'])} → {_pct(esc['robust_accuracy_after'])}.", "",
                  "| step | attacked | robust before | robust after | time (s) |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {st['attack']} | {st['attacked']} | {_pct(st['robust_before'])} | {_pct(st['robust_after'])} | "
                  f"{st['seconds']:.1f} |" for st in esc["steps"]]  # fmt: skip
    if data["defects"]:
        lines += ["", "## Attack defects", ""] + [f"- {d}" for d in data["defects"]]
    if "interpretability" in data:
        from advtrain.evaluation.interpretability import interpretability_markdown

        lines += interpretability_markdown(data["interpretability"])
    lines += ["", "Attack configurations:", ""] + [f"- {n}: `{a['config']}`" for n, a in data["attacks"].items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    if plots:
        plot_accuracy_vs_eps(report, out / "accuracy_vs_eps.png")
        plot_minimal_norms(report, out / "minimal_norms.png")
    return out


#: Metadata keys the header table of ``report.md`` shows; other ``meta`` keys are listed below it.
_HEADER_KEYS = ("robustbench", "checkpoint", "checkpoint_sha256", "dataset", "split", "device", "device_name", "suite",
                "seed")  # fmt: skip


def _header(data: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    """The leaderboard facts of a report as a two-column table: what was evaluated, on which samples, under which
    threat model and attacks, with what result, software and hardware; then any other metadata as a list."""
    rows = []
    rb = data.get("robustbench")
    if rb:
        rows.append(("model", f"RobustBench `{rb['model']}` ({rb['dataset']}, {rb['threat_model']}; robustbench "
                              f"{rb.get('version') or '?'})"))  # fmt: skip
    if data.get("checkpoint"):
        digest = f" (SHA-256 `{data['checkpoint_sha256']}`)" if data.get("checkpoint_sha256") else ""
        rows.append(("checkpoint", f"`{data['checkpoint']}`{digest}"))
    sel = data.get("sample_selection") or {}
    if sel.get("count"):
        span = (f"positions {sel['first']}–{sel['first'] + sel['count'] - 1}" if sel.get("contiguous")
                else f"{sel['count']} positions from {sel['first']}")  # fmt: skip
        where = ", ".join(str(v) for v in (data.get("dataset"), sel.get("split") and f"{sel['split']} split") if v)
        rows.append(("samples", f"{sel['count']}{' of ' + where if where else ''}: {span} (SHA-256 `{sel['sha256']}`)"))
    fraction = f" ({data['eps_fraction']})" if data.get("eps_fraction") else ""
    rows.append(("threat model", f"{data.get('threat_model', data['norm'])}, ε = {data['eps']:.6g}{fraction}"))
    suite = data.get("suite")
    seed = data.get("seed")
    attacks = ", ".join(data["attacks"])
    rows.append(("attacks", f"{'suite ' + suite + ': ' if suite else ''}{attacks}"
                            f"{'; seed ' + str(seed) if seed is not None else ''} (configurations below)"))  # fmt: skip
    rows.append(("clean accuracy", _pct(data["clean_accuracy"])))
    rows.append(("robust accuracy", f"{_pct(data['robust_accuracy_all'])} (worst case over all attacks)"))
    versions = data.get("versions") or {}
    rows.append(("software", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
    if data.get("device"):
        name = f" ({data['device_name']})" if data.get("device_name") else ""
        rows.append(("device", f"{data['device']}{name}"))
    lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    extra = [f"- {k}: `{v}`" for k, v in meta.items() if k not in _HEADER_KEYS]
    return lines + extra


#: What defines an evaluation: two reports that differ here did not evaluate the same model in the same way.
_SETUP_KEYS = ("robustbench", "checkpoint_sha256", "threat_model", "eps", "eps_grid", "sample_selection", "seed",
               "suite", "cascade")  # fmt: skip
#: Where two runs of one evaluation may differ without changing what was evaluated (results may still move a little).
_ENVIRONMENT_KEYS = ("versions", "device", "device_name", "fused", "max_fused_batch")


def compare_reports(a: str | Path | Mapping[str, Any], b: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """What differs between two ``report.json`` files (paths or loaded dicts).

    Returns:
        ``{"same_setup": bool, "setup": {key: (a, b)}, "environment": {key: (a, b)}, "results": {key: (a, b, b − a)}}``:
        ``setup`` holds the differing fields that define the evaluation (model file, threat model, ε, samples, seed,
        suite, and ``attacks.<name>`` for an attack configuration present in only one or configured differently),
        ``environment`` the differing versions and device, ``results`` the clean and worst-case robust accuracy and
        each common attack's robust accuracy.
    """
    a, b = (json.loads(Path(r).read_text()) if isinstance(r, (str, Path)) else dict(r) for r in (a, b))
    setup = {k: (a.get(k), b.get(k)) for k in _SETUP_KEYS if a.get(k) != b.get(k)}
    attacks_a, attacks_b = a.get("attacks", {}), b.get("attacks", {})
    for name in sorted(set(attacks_a) | set(attacks_b)):
        config_a, config_b = (attacks.get(name, {}).get("config") for attacks in (attacks_a, attacks_b))
        if config_a != config_b:
            setup[f"attacks.{name}"] = (config_a, config_b)
    environment = {k: (a.get(k), b.get(k)) for k in _ENVIRONMENT_KEYS if a.get(k) != b.get(k)}
    pairs = {"clean_accuracy": (a.get("clean_accuracy"), b.get("clean_accuracy")),
             "robust_accuracy_all": (a.get("robust_accuracy_all"), b.get("robust_accuracy_all"))}  # fmt: skip
    for name in sorted(set(attacks_a) & set(attacks_b)):
        pairs[f"attacks.{name}"] = (attacks_a[name].get("robust_accuracy"), attacks_b[name].get("robust_accuracy"))
    results = {k: (x, y, y - x if isinstance(x, (int, float)) and isinstance(y, (int, float)) else None)
               for k, (x, y) in pairs.items()}  # fmt: skip
    return {"same_setup": not setup, "setup": setup, "environment": environment, "results": results}


def accuracy_figure(report: RobustnessReport):
    """A matplotlib figure of robust accuracy versus ε per attack (thin) and the worst case "All" (thick).

    A bare :class:`matplotlib.figure.Figure`, outside pyplot: the caller's backend (a notebook's) is left as it is
    and nothing needs closing."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, (xs, ys) in report.curves().items():
        style = {"linewidth": 3, "color": "black"} if name == "All" else {"linewidth": 1.2, "marker": "."}
        ax.plot(xs, [100 * y for y in ys], label=name, **style)
    ax.set_xlabel(f"ε ({report.summary['norm']})")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_eps(report: RobustnessReport, path: str | Path) -> Path:
    """Saves :func:`accuracy_figure` as a PNG."""
    accuracy_figure(report).savefig(path, dpi=120)
    return Path(path)


def plot_minimal_norms(report: RobustnessReport, path: str | Path) -> Path | None:
    """Saves a histogram of the verified norms of the minimal-norm attacks' successes (nothing without one)."""
    minimal = [(name, a) for name, a in report.summary["attacks"].items() if a["kind"] == "minimal"]
    if not minimal:
        return None
    from matplotlib.figure import Figure

    names = list(report.summary["attacks"])
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, _ in minimal:
        a = names.index(name)
        norms = report.data["norms"][:, a, 0]
        norms = norms[torch.isfinite(norms)]
        if norms.numel():
            ax.hist(norms.numpy(), bins=30, alpha=0.5, label=name)
    for e in report.summary["eps_grid"]:
        ax.axvline(e, color="grey", linewidth=0.5)
    ax.set_xlabel(f"minimal adversarial norm ({report.summary['norm']})")
    ax.set_ylabel("samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)

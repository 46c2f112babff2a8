"""Robust accuracy of a model under a set of attacks, with the framework's own verification of every claim."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from advtrain.attacks.base import Attack
from advtrain.engine.modes import attack_context
from advtrain.threat.norms import as_eps_tensor

log = logging.getLogger(__name__)


@dataclass
class _AttackTally:
    robust: int = 0
    claimed: int = 0
    verified: int = 0
    false_claims: int = 0
    forward_passes: int = 0
    backward_passes: int = 0
    seconds: float = 0.0


@dataclass
class RobustnessReport:
    """Counts over an evaluation set; accuracies are fractions of all evaluated samples.

    A sample counts as robust to an attack when it is classified correctly both clean and at the verified
    adversarial point (RobustBench's convention). "All" is the per-sample worst case over every attack.
    """

    total: int = 0
    clean_correct: int = 0
    all_robust: int = 0
    attacks: dict[str, _AttackTally] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        n = max(self.total, 1)
        return {
            "samples": self.total,
            "clean_accuracy": self.clean_correct / n,
            "robust_accuracy_all": self.all_robust / n,
            "attacks": {
                name: {
                    "config": self.configs[name],
                    "robust_accuracy": t.robust / n,
                    "claimed_successes": t.claimed,
                    "verified_successes": t.verified,
                    "false_claims": t.false_claims,
                    "forward_passes": t.forward_passes,
                    "backward_passes": t.backward_passes,
                    "seconds": round(t.seconds, 3),
                }
                for name, t in self.attacks.items()
            },
            "wall_time_s": round(self.seconds, 3),
        }


def _verify(attack: Attack, inputs: Tensor, adv: Tensor) -> Tensor:
    """Clips a claimed adversarial batch back into the attack's ball (if it has one) and the [0, 1] box."""
    geometry = getattr(attack, "geometry", None)
    eps = getattr(attack, "eps", None)
    delta = adv.float() - inputs.float()
    if geometry is not None and eps is not None:
        delta = geometry.project_ball_box(inputs.float(), delta, as_eps_tensor(eps, inputs))
    return (inputs.float() + delta).clamp(0.0, 1.0).to(inputs.dtype)


def evaluate_robustness(
    model: nn.Module,
    batches: Iterable,
    attacks: Mapping[str, Attack],
    *,
    device: torch.device | str = "cpu",
    max_samples: int | None = None,
    progress: bool = True,
) -> RobustnessReport:
    """Runs every attack on every batch and verifies each claimed adversarial example with a fresh forward pass.

    Args:
        model: classifier taking [0, 1] inputs (evaluated in eval mode; its mode is restored afterwards).
        batches: iterable of ``(x, y)`` or ``(x, y, index)``.
        attacks: name → attack.
        device: where to run.
        max_samples: stop after this many samples.
        progress: show a progress bar.

    Returns:
        The :class:`RobustnessReport`.
    """
    report = RobustnessReport(attacks={name: _AttackTally() for name in attacks})
    report.configs = {name: repr(a) for name, a in attacks.items()}
    start = time.perf_counter()
    bar = tqdm(total=max_samples, desc="evaluate", unit="img", disable=not progress)
    model = model.to(device)
    for batch in batches:
        x, y = batch[0].to(device), batch[1].to(device)
        if max_samples is not None:
            room = max_samples - report.total
            if room <= 0:
                break
            x, y = x[:room], y[:room]
        with torch.no_grad(), attack_context(model, "eval"):
            clean_ok = model(x).argmax(1) == y
        robust_all = clean_ok.clone()
        for name, attack in attacks.items():
            tally = report.attacks[name]
            t0 = time.perf_counter()
            result = attack(model, x, y)
            tally.seconds += time.perf_counter() - t0
            adv = _verify(attack, x, result.adv)
            with torch.no_grad(), attack_context(model, "eval"):
                adv_ok = model(adv).argmax(1) == y
            fooled = ~adv_ok
            tally.claimed += int(result.success.sum())
            tally.verified += int((fooled & clean_ok).sum())
            tally.false_claims += int((result.success & ~fooled).sum())
            tally.robust += int((clean_ok & adv_ok).sum())
            tally.forward_passes += result.forward_passes
            tally.backward_passes += result.backward_passes
            robust_all &= adv_ok
        report.total += x.shape[0]
        report.clean_correct += int(clean_ok.sum())
        report.all_robust += int(robust_all.sum())
        bar.update(x.shape[0])
    bar.close()
    report.seconds = time.perf_counter() - start
    for name, tally in report.attacks.items():
        if tally.false_claims:
            log.warning("Attack %s claimed %d successes that did not hold on re-check (attack defect).", name,
                        tally.false_claims)  # fmt: skip
    return report


def write_report(report: RobustnessReport, output: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Writes ``report.json`` and ``report.md`` into ``output`` and returns the folder."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    data = {**(dict(meta) if meta else {}), **report.as_dict()}
    (out / "report.json").write_text(json.dumps(data, indent=2))
    lines = ["# advtrain robustness report", ""]
    lines += [f"- {k}: `{v}`" for k, v in (meta or {}).items()]
    lines += [
        f"- samples: {data['samples']}",
        f"- clean accuracy: {100 * data['clean_accuracy']:.2f}%",
        f"- robust accuracy, worst case over all attacks: {100 * data['robust_accuracy_all']:.2f}%",
        f"- wall time: {data['wall_time_s']:.1f} s",
        "",
        "| attack | robust acc. | verified successes | false claims | fwd passes | bwd passes | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, a in data["attacks"].items():
        lines.append(
            f"| {name} | {100 * a['robust_accuracy']:.2f}% | {a['verified_successes']} | {a['false_claims']} | "
            f"{a['forward_passes']} | {a['backward_passes']} | {a['seconds']:.1f} |"
        )
    lines += ["", "Attack configurations:", ""] + [f"- {n}: `{a['config']}`" for n, a in data["attacks"].items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out

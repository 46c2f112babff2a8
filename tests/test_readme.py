"""The README opens with the two set-up commands, and CI runs exactly the README's test command."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_opens_with_install_and_run_then_install_and_test():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert "pip install -e ." in blocks[0] and "advtrain fit --config recipes/quickstart.yaml" in blocks[0]
    assert 'pip install -q -e ".[dev]"' in blocks[1] and "pytest" in blocks[1]


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = _bash_blocks((ROOT / "README.md").read_text())[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    assert any("WANDB_MODE=offline" in line for line in ci_lines)


def test_every_test_the_readme_cites_exists():
    """``test_x.py::test_name`` (and ``::test_name`` after it, same file) in the README name real tests."""
    cited, current = [], None
    for file, name in re.findall(r"`(?:tests/)?(test_\w+\.py)?::(\w+)`", (ROOT / "README.md").read_text()):
        current = file or current
        cited.append((current, name))
    assert len(cited) > 10
    missing = [f"{f}::{n}" for f, n in cited if f is None or f"def {n}(" not in (ROOT / "tests" / f).read_text()]
    assert not missing, f"the README cites tests that do not exist: {missing}"


def test_readme_reproduces_a_leaderboard_entry(tmp_path):
    """The section's three lines: install the extra, put the leaderboard's file in place, one ``advtrain evaluate``.
    The command runs as written (random weights of that entry where the second line puts the file, fake CIFAR-10
    files), with test-sized settings appended (later flags win), and reports the leaderboard's threat model."""
    section = (ROOT / "README.md").read_text().split("## Reproduce a leaderboard entry", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("   #")[0].strip() for line in _bash_blocks(section)[0].splitlines()]
    assert len(lines) == 3 and '".[robustbench]"' in lines[0]
    command = shlex.split(lines[2])
    assert command[:2] == ["advtrain", "evaluate"]
    name, path = command[command.index("--robustbench") + 1], Path(command[command.index("--ckpt_path") + 1])
    assert str(path.parent) in lines[1] and path.name in lines[1]
    if importlib.util.find_spec("robustbench") is None:
        pytest.skip("robustbench is not installed")
    from helpers import run_advtrain
    from test_robustbench import SMALL, fake_cifar10_for

    from advtrain.models.robustbench import _zoo_models, robustbench_entry

    entry = robustbench_entry(name, path)
    assert (entry.dataset, entry.threat_model) == ("cifar10", "Linf")  # from the file's place
    (tmp_path / path).parent.mkdir(parents=True)
    torch.save(_zoo_models(entry.dataset, entry.threat_model)[name]["model"]().state_dict(), tmp_path / path)
    done = run_advtrain(*command[1:], *SMALL, cwd=tmp_path, env=fake_cifar10_for(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / f"{path.with_suffix('')}-eval" / "report.json").read_text())
    assert report["robustbench"]["model"] == name and report["threat_model"] == "Linf" and report["eps"] == 8 / 255

"""The README opens with the two set-up commands, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

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

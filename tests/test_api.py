"""`fedkd.run(...)`: the README's Python snippet runs as written and returns the summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    section = README.read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow  # a Ray simulation; the default suite keeps one (tests/test_simulation.py)
def test_the_readme_snippet_runs_a_real_simulation(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path / "cache"))
    scope: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), scope)  # noqa: S102 (our own README)
    summary = scope["summary"]
    assert summary["status"] == "ok"
    assert summary["num_clients"] == 4 and summary["num_rounds"] == 3
    assert summary["final_mean_accuracy"] > 0.5  # 10 classes: chance is 0.1
    written = json.loads((tmp_path / "outputs" / "api-example" / "summary.json").read_text())
    assert written["final_mean_accuracy"] == summary["final_mean_accuracy"]
    assert capsys.readouterr().out.startswith("ok ")

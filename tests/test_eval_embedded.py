"""benchmarks/eval_embedded.py: its command line refuses what it cannot do before it loads a model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def load_eval():
    path = Path(__file__).parents[1] / "benchmarks" / "eval_embedded.py"
    spec = importlib.util.spec_from_file_location("eval_embedded", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_skip_espeak_and_espeak_only_are_refused_together(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        load_eval().main(["--skip-espeak", "--espeak-only", "--model", str(tmp_path / "absent")])
    assert stop.value.code == 2
    assert "--skip-espeak and --espeak-only exclude each other" in capsys.readouterr().err

"""Ctrl-C in any command exits 130 with one line (never click's "Aborted!" and exit 1). The commands that
resume say how far they got (tested with real SIGINTs beside them: teach, enhance, reshard, train); those
that write at the end say nothing was written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mlmfilter import api
from mlmfilter.cli.app import app

runner = CliRunner()


def _stopped(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "verb, argv, said",
    [
        ("select", ["select", "RUN", "--where", "rules_ok"], "interrupted; the selection is not complete"),
        ("evaluate_corrupt", ["eval", "corrupt", "IN"], "interrupted; nothing was written: re-run the same command"),
        ("stats", ["stats", "RUN"], "interrupted; re-run the same command"),
    ],
)
def test_ctrl_c_exits_130_with_one_line(monkeypatch, tmp_path, verb, argv, said):
    monkeypatch.setattr(api, verb, _stopped)
    result = runner.invoke(app, [str(tmp_path) if a in ("RUN", "IN") else a for a in argv])
    assert result.exit_code == 130, result.output
    assert said in " ".join(result.output.split())
    assert "Aborted" not in result.output and "Traceback" not in result.output

"""CI runs a seconds-long smoke of the load generator (issue 6): both targets produce their figures."""

from __future__ import annotations

import pytest

from bench import smoke

pytestmark = pytest.mark.slow


def test_bench_smoke_produces_figures() -> None:
    result = smoke.run(timeout=90)
    assert result["ok"], f"{result['problems']}\n{result['log'][-2000:]}"
    assert result["exit_code"] == 0
    assert result["ratio_ours_to_baseline"] is not None

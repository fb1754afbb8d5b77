"""metrics.jsonl lines are exactly json.dumps of the entry, written faster."""

from __future__ import annotations

import json
import math

import pytest

from hardtrain.telemetry import _metrics_line


@pytest.mark.parametrize("entry", [
    {"step": 1, "loss": 1.2086325883865356, "lr": 0.01, "step_time_s": 0.005694},
    {"step": 2, "loss": math.nan, "lr": None, "step_time_s": 1e-07},
    {"step": 3, "loss": None, "lr": 3, "step_time_s": 0.0},
    {"step": 4, "loss": -math.inf, "lr": 1e300, "step_time_s": 123456.789},
    {"step": 5, "loss": 5e-324, "lr": True, "step_time_s": -0.0},
])
def test_a_metrics_line_is_the_json_of_its_entry(entry: dict[str, object]) -> None:
    line = _metrics_line(entry)
    assert line == json.dumps(entry) + "\n"
    back = json.loads(line)
    assert all(back[k] == v or (isinstance(v, float) and math.isnan(v)) for k, v in entry.items())

"""The benchmark's smoke configuration, end to end: every output, every strategy and seed (not the result)."""

import json

from ale_backend.bench.__main__ import main
from ale_backend.bench.protocol import PRESETS
from ale_backend.scoring import STRATEGIES


def test_the_smoke_configuration_produces_every_output(tmp_path):
    assert main(["--config", "smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    smoke = PRESETS["smoke"]
    expected = {(s, b, seed) for s in STRATEGIES for b in smoke.budgets for seed in smoke.seeds}
    assert {(r["strategy"], r["budget"], r["seed"]) for r in results["runs"]} == expected
    assert {b["seed"] for b in results["baselines"]} == set(smoke.seeds)
    for run in results["runs"]:
        assert run["images"] == run["budget"] == len(run["selected"])
        assert 0 <= run["map50_95"] <= 1 and 0 <= run["new_ap50_95"] <= 1 and run["boxes"] >= run["images"]
    assert results["selection_knobs"] == {"conf": 0.25, "iou": 0.45, "max_det": 100, "nms": "class-agnostic"}
    report = (tmp_path / "report.md").read_text()
    for strategy in STRATEGIES:
        assert f"| {strategy} |" in report
    assert "paper's table shape" in report and "Normalised area" in report
    assert "| ale-lc-max vs lc-max |" in report  # share of images sqrt(N) left in the selection
    assert "one base model per seed" in report
    for baseline in results["baselines"]:  # the N of ALE on the pool, per image
        assert sum(baseline["pool_detections_per_image"]) == smoke.data.counts["pool"]
    assert (tmp_path / "budget_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The benchmark's smoke configuration, end to end: every output, every strategy and seed (not the result); the base
model cache; the report's verdict on hand-made results."""

import dataclasses
import json

import pytest

from ale_backend.orders import ORDERS
from ale_backend.scoring import STRATEGIES
from ale_backend.settings import Settings
from benchmarks.active_learning import report
from benchmarks.active_learning.__main__ import main
from benchmarks.active_learning.newspecies import GeneratedDigits
from benchmarks.active_learning.protocol import PRESETS, base_model_key


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out, cache = tmp_path_factory.mktemp("smoke"), tmp_path_factory.mktemp("cache")
    assert main(["--config", "smoke", "--out", str(out), "--cache", str(cache)]) == 0
    return out, cache


def test_the_smoke_configuration_produces_every_output(smoke_run):
    out, _ = smoke_run
    results = json.loads((out / "results.json").read_text())
    smoke = PRESETS["smoke"]
    expected = {(s, b, seed) for s in STRATEGIES for b in smoke.budgets for seed in smoke.seeds}
    assert {(r["strategy"], r["budget"], r["seed"]) for r in results["runs"]} == expected
    assert {b["seed"] for b in results["baselines"]} == set(smoke.seeds) and results["complete"]
    for run in results["runs"]:
        assert run["images"] == run["budget"] == len(run["selected"])
        assert 0 <= run["map50_95"] <= 1 and 0 <= run["new_ap50_95"] <= 1 and run["boxes"] >= run["images"]
    assert results["selection_knobs"] == {"conf": 0.1, "iou": 0.45, "max_det": 100, "nms": "class-agnostic"}
    pool = smoke.data.counts["pool"]
    for baseline in results["baselines"]:
        assert sum(baseline["pool_detections_per_image"]) == pool  # the N of ALE on the pool, per image
        assert len(baseline["diagnosis"]["images"]) == pool
        assert set(baseline["selection"]) == set(STRATEGIES) | set(ORDERS)  # the orders are counted too
    report_text = (out / "report.md").read_text()
    for strategy in STRATEGIES:
        assert f"| {strategy} |" in report_text
    for section in ("## Verdict", "## Diagnosis", "## What each strategy selects", "paper's table shape",
                    "Normalised area", "| ale-lc-max vs lc-max |", "one base model per seed"):
        assert section in report_text
    assert (out / "budget_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_run_takes_the_base_models_from_the_cache(smoke_run, tmp_path):
    _, cache = smoke_run
    weights = sorted(cache.glob("base-*/base-weights.pt"))
    assert len(weights) == len(PRESETS["smoke"].seeds)
    stamps = [w.stat().st_mtime_ns for w in weights]
    assert main(["--config", "smoke", "--out", str(tmp_path), "--cache", str(cache), "--strategies", "random"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [w.stat().st_mtime_ns for w in sorted(cache.glob("base-*/base-weights.pt"))] == stamps
    assert not (tmp_path / "work" / "seed0" / "base").exists()  # nothing was trained for it
    assert {b["base_model"] for b in results["baselines"]} == {
        b["base_model"] for b in json.loads((smoke_run[0] / "results.json").read_text())["baselines"]}


def test_the_cache_key_follows_what_shapes_the_base_model_only(tmp_path):
    smoke = PRESETS["smoke"]
    source = GeneratedDigits(smoke.data)
    data = source.write(0, tmp_path / "a")
    key = base_model_key(smoke, data)
    assert base_model_key(smoke, source.write(0, tmp_path / "again")) == key  # the same content, wherever it lies
    assert base_model_key(smoke, source.write(1, tmp_path / "b")) != key
    for shaping in ({"base_epochs": 99}, {"imgsz": 128}, {"mosaic": 0.5}, {"fliplr": 0.5}):
        assert base_model_key(dataclasses.replace(smoke, **shaping), data) != key, shaping
    other = GeneratedDigits(dataclasses.replace(smoke.data, counts={**smoke.data.counts, "base": 15}))
    assert base_model_key(smoke, other.write(0, tmp_path / "c")) != key
    for unrelated in ({"strategies": ("random",)}, {"budgets": (10,)}, {"finetune_epochs": 3}, {"replay": 7},
                      {"replay": None}, {"keep_best": True}, {"finetune_patience": 4}, {"finetune_epochs": None},
                      {"box_budgets": (50,)},
                      {"recipe": (("train_lr0", 0.001), ("train_freeze", 10))},
                      {"score_conf": 0.3}, {"name": "other"}):
        assert base_model_key(dataclasses.replace(smoke, **unrelated), data) == key, unrelated
    pool_only = GeneratedDigits(dataclasses.replace(smoke.data, counts={**smoke.data.counts, "pool": 10, "test": 5}))
    assert base_model_key(smoke, pool_only.write(0, tmp_path / "d")) == key


def fake_results(default_gains: dict[int, list[float]]) -> dict:
    """Runs of random and the default over five seeds; the default's mAP and new-class AP exceed random's by the
    given gains per budget and seed."""
    runs, baselines = [], []
    for seed in range(5):
        baselines.append({"seed": seed, "map50_95": 0.5, "map50": 0.7, "new_ap50_95": 0.0, "known_ap50_95": 0.6})
        for budget, gains in default_gains.items():
            for strategy, gain in (("random", 0.0), ("ale-unknown-mean", gains[seed])):
                runs.append({"seed": seed, "strategy": strategy, "budget": budget, "images": budget,
                             "boxes": budget, "new_boxes": 1, "selected": [], "map50_95": 0.5 + gain,
                             "new_ap50_95": 0.1 + gain, "known_ap50_95": 0.6})
    config = {"name": "fake", "data": {"image_size": 160, "counts": {"base": 1, "pool": 2, "test": 3}},
              "base_epochs": 1, "finetune_epochs": 1, "replay": 1, "batch": 1, "mosaic": 0.0}
    return {"config": config, "selection_knobs": {"conf": 0.1}, "default_strategy": "ale-unknown-mean",
            "new_classes": ["digit3"], "baselines": baselines, "runs": runs, "seconds": 1.0}


def test_a_configuration_without_its_own_epochs_trains_the_products_round(tmp_path):
    from benchmarks.active_learning.protocol import _settings

    product = Settings()
    rounds = _settings(dataclasses.replace(PRESETS["smoke"], finetune_epochs=None), 0, tmp_path)
    assert (rounds.train_epochs, rounds.train_patience, rounds.train_min_epochs, rounds.train_min_delta,
            rounds.train_keep_best) == (product.train_epochs, product.train_patience, product.train_min_epochs,
                                        product.train_min_delta, True)  # (the least gain: sized to the seed's split)
    fixed = _settings(dataclasses.replace(PRESETS["smoke"], finetune_epochs=7), 0, tmp_path)
    assert (fixed.train_epochs, fixed.train_patience, fixed.train_min_epochs) == (7, 8, 0)


@pytest.mark.parametrize("gains, verdict", [
    ({50: [0.1, 0.1, 0.1, 0.1, -0.1], 100: [0.1, 0.2, 0.1, 0.1, -0.3]}, "met"),
    ({50: [0.1, 0.1, 0.1, -0.1, -0.1], 100: [0.1, 0.1, 0.1, 0.1, 0.1]}, "not met"),
])
def test_the_verdict_asks_for_four_of_five_seeds_at_50_and_100_images(tmp_path, gains, verdict):
    report.write(fake_results(gains), tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert f"**{verdict}**" in text
    assert "| 50 | +0.060 +- 0.080 (4/5) |" in text if verdict == "met" else "(3/5)" in text


def test_the_first_table_says_what_labels_buy_over_the_base_model(tmp_path):
    results = fake_results({25: [0.0, 0.1, 0.2, 0.1, 0.1], 50: [0.1, 0.1, 0.1, 0.1, 0.1]})
    for run in results["runs"]:
        run["promoted"] = run["strategy"] == "random" or run["seed"] > 0
    results["runs"] += [{"seed": seed, "strategy": "base-only", "budget": 0, "images": 0, "boxes": 0,
                         "new_boxes": 0, "selected": [], "map50_95": 0.45, "new_ap50_95": 0.0,
                         "known_ap50_95": 0.6, "promoted": False} for seed in range(5)]
    report.write(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    table = text[text.index("## What labels buy"):text.index("## Verdict")]
    assert "| base model | | | 0.500 +- 0.000 |" in table
    # random at 50 images: 0.5 on every seed, no change; the default +0.1 on every seed, 4 of 5 promoted
    assert "| random, 50 | 50 | 50 | 0.500 +- 0.000 | +0.000 +- 0.000 (0/5) | +0.0000 | 0.100 +- 0.000 | " \
           "+0.100 +- 0.000 (5/5) | 5/5 |" in table
    # +0.1 over the base model from 50 boxes: +0.2 per 100 boxes
    assert "| ale-unknown-mean, 50 | 50 | 50 | 0.600 +- 0.000 | +0.100 +- 0.000 (5/5) | +0.2000 |" in table
    assert "| ale-unknown-mean, 50 |" in table and table.count("| 4/5 |") == 2
    assert "| base images only, no selection | 0 | 0 | 0.450 +- 0.000 | -0.050 +- 0.000 (0/5) |" in table
    assert "## Budget 0" not in text  # the control is not a strategy
    assert "Fine-tunes above the base model's mAP50-95: 9 of 20 (45%)" in text


def test_runs_at_a_box_budget_get_their_own_table_apart_from_the_image_budgets(tmp_path):
    results = fake_results({50: [0.1] * 5})
    for seed in range(5):  # at 200 boxes: random takes 25 images, the default 10 crowded ones and gains less
        for strategy, images, boxes, gain in (("random", 25, 205, 0.04), ("ale-unknown-mean", 10, 210, 0.02)):
            results["runs"].append({"seed": seed, "strategy": strategy, "budget": 200, "budget_unit": "boxes",
                                    "images": images, "boxes": boxes, "new_boxes": 3, "selected": [],
                                    "map50_95": 0.5 + gain, "new_ap50_95": 0.1 + gain, "known_ap50_95": 0.6})
    report.write(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "## Budget 200" not in text and "| random, 200 |" not in text  # not mixed with the image budgets
    table = text[text.index("## At equal effort"):text.index("## Verdict")]
    assert "| 205 | random | 25.0 | 3.0 | 0.540 +- 0.000 | +0.040 +- 0.000 (5/5) | +0.0195 |" in table
    assert ("| 210 | ale-unknown-mean | 10.0 | 3.0 | 0.520 +- 0.000 | +0.020 +- 0.000 (5/5) | +0.0095 | "
            "0.120 +- 0.000 | +0.120 +- 0.000 (5/5) | -0.020 +- 0.000 (0/5) | -0.020 +- 0.000 (0/5) |") in table
    assert (tmp_path / "budget_curves.png").stat().st_size > 0


def test_past_the_deadline_no_fine_tune_starts_and_the_report_says_so(smoke_run, tmp_path):
    _, cache = smoke_run
    assert main(["--config", "smoke", "--out", str(tmp_path), "--cache", str(cache), "--deadline", "0"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["runs"] == [] and results["complete"] is False
    assert len(results["baselines"]) == len(PRESETS["smoke"].seeds)  # the diagnosis needs no fine-tune
    text = (tmp_path / "report.md").read_text()
    assert "**Incomplete**" in text and "## Diagnosis" in text


def test_the_recipe_table_pairs_each_fine_tune_with_its_seeds_base_model(tmp_path, capsys):
    from benchmarks import recipe_table

    results = {"config": {"recipe": [["train_lr0", 0.002], ["train_nominal_batch", 16]]},
               "baselines": [{"seed": 0, "map50_95": 0.10}, {"seed": 1, "map50_95": 0.20}],
               "runs": [{"seed": s, "strategy": strategy, "budget": budget, "map50_95": m, "new_ap50_95": 0.01,
                         "promoted": True, "best_epoch": 3, "epochs_run": 5, "train_seconds": 60.0}
                        for s, strategy, budget, m in ((0, "random", 50, 0.12), (1, "random", 50, 0.19),
                                                       (0, "base-only", 0, 0.11), (1, "base-only", 0, 0.21))]}
    (tmp_path / "lr").mkdir()
    (tmp_path / "lr" / "results.json").write_text(json.dumps(results))
    assert recipe_table.main([str(tmp_path / "lr")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == ("| lr (lr0 0.002, nominal_batch 16) | base only | 0.160 | +0.010 (2/2) | 0.010 | 2/2 | "
                        "3 of 5/3 of 5 | 60 |")
    assert lines[3].startswith("| lr (lr0 0.002, nominal_batch 16) | base + random 50 | 0.155 | +0.005 (1/2) |")


def test_a_fine_tunes_cached_figures_are_keyed_by_the_test_split_and_every_recipe_setting(tmp_path):
    """A cached fine-tune holds test-set figures: a changed test split, or a recipe setting that ultralytics'
    arguments do not carry (train_amp, train_workers, train_device), gives it another key."""
    from types import SimpleNamespace

    from ale_backend.settings import Settings
    from benchmarks.active_learning.protocol import _Seed

    smoke = PRESETS["smoke"]
    data = GeneratedDigits(smoke.data).write(0, tmp_path / "a")

    def digest(settings=None, seed_data=data) -> str:
        return _Seed._scoring_digest.fget(SimpleNamespace(settings=settings or Settings(), data=seed_data,
                                                          _scoring=None))

    key = digest()
    assert digest(seed_data=GeneratedDigits(smoke.data).write(0, tmp_path / "again")) == key
    for changed in ({"train_amp": True}, {"train_workers": 3}, {"train_device": "cuda:1"}, {"score_conf": 0.3}):
        assert digest(Settings(**changed)) != key, changed
    assert digest(Settings(log_level="DEBUG")) == key  # unrelated
    label = sorted((data.root / "test" / "labels").glob("*.txt"))[0]
    label.write_text(label.read_text() + "0 0.5 0.5 0.1 0.1\n")  # one more box in the test split
    assert digest() != key


def test_a_photographs_run_says_which_of_its_criteria_hold(tmp_path):
    results = fake_results({25: [0.01, 0.01, 0.01, 0.01, -0.01], 50: [0.02, 0.01, 0.01, -0.01, 0.01]})
    results["data"] = {"source": "YOLO dataset", "data": "aquarium", "classes": ["a", "b"]}
    for run in results["runs"]:
        if run["strategy"] == "random" and run["budget"] == 50:
            run["map50_95"] = 0.64  # +28 % over the base model's 0.5
    report.write(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    table = text[text.index("## The photographs' criterion"):]
    assert "| fine-tunes above their seed's base model: 13 of 20 | no |" in table  # random at 25 stays at 0.5
    assert "| random at 50 images over the base model: +28% (mean of 5 seeds) | yes |" in table
    assert "new-class AP at 25 images: +0.006 +- 0.008 (4/5) | yes |" in table
    assert "mAP50-95 at 50 images: -0.132 +- 0.010 (0/5) | no |" in table

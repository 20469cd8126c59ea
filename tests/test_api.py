"""The backend's HTTP API through Flask's test client, with the real model and a real image server."""

import dataclasses
from collections import OrderedDict

import pytest
from label_studio_sdk.label_interface import LabelInterface

from ale_backend import detector as detector_module
from ale_backend.model_source import resolve_model_source
from ale_backend.scoring import UNREADABLE_PRIORITY, priority
from ale_backend.server import create_app
from testkit.label_studio_stand_in import LABEL_CONFIG


@pytest.fixture()
def served(settings, image_server, redis_url, tmp_path):
    """The app with the trained model, reading Label Studio images from the local image server."""
    app_settings = dataclasses.replace(
        settings, model_dir=tmp_path / "models", label_studio_url=image_server.url,
        label_studio_api_key=image_server.legacy_token, redis_url=redis_url,
    )
    return create_app(app_settings, warm_up=False).test_client(), app_settings


def predict(client, tasks, config=LABEL_CONFIG):
    return client.post("/predict", json={"tasks": tasks, "project": "1.1700000000", "label_config": config})


def upload_tasks(sample_images, count=8):
    return [{"id": 100 + i, "data": {"image": f"/data/upload/1/{p.name}"}} for i, p in enumerate(sample_images[:count])]


def test_health_answers(served):
    client, _ = served
    response = client.get("/health")
    assert response.status_code == 200 and response.json["status"] == "UP"


def test_setup_reports_the_model_version_without_loading_the_model(served, monkeypatch):
    client, app_settings = served
    monkeypatch.setattr(detector_module, "_detectors", OrderedDict())  # nothing loaded in this process
    response = client.post("/setup", json={"project": "1.1700000000", "schema": LABEL_CONFIG, "hostname": "",
                                           "access_token": ""})
    assert response.status_code == 200
    assert response.json["model_version"] == resolve_model_source(app_settings).version
    assert not detector_module._detectors  # what keeps it within Label Studio's 3 s (speed: docs/speed.md)


def test_predictions_are_valid_for_label_studio_and_ordered_by_ale(served, sample_images):
    client, app_settings = served
    tasks = upload_tasks(sample_images)
    response = predict(client, tasks)
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert len(results) == len(tasks)

    interface = LabelInterface(LABEL_CONFIG)
    version = resolve_model_source(app_settings).version
    regions = 0
    for prediction in results:
        assert prediction["model_version"] == version
        assert interface.validate_prediction(
            {k: prediction[k] for k in ("result", "score", "model_version")}, return_errors=True
        ) == []
        ale = prediction["ale"]
        assert ale["strategy"] == "ale-unknown-mean" and ale["detections"] >= 0
        assert prediction["score"] == pytest.approx(priority(ale["value"]), rel=2e-6)  # up to the tie-break
        for region in prediction["result"]:
            regions += 1
            assert region["value"]["rectanglelabels"][0] in {"Circle", "box"}  # never the unlabelled "triangle"
            assert region["score"] >= app_settings.display_conf
            assert (region["original_width"], region["original_height"]) == (160, 160)
            value = region["value"]
            assert 0 <= value["x"] and value["x"] + value["width"] <= 100 + 1e-6
            assert 0 <= value["y"] and value["y"] + value["height"] <= 100 + 1e-6
    assert regions > 0

    # Label Studio serves the lowest score first: that must be the highest-ALE task.
    by_score = min(results, key=lambda p: p["score"])
    by_ale = max(results, key=lambda p: p["ale"]["value"])
    assert by_score is by_ale
    assert len({p["ale"]["value"] for p in results}) > 1  # the scores do discriminate


def test_a_broken_image_fails_only_its_own_task(served, sample_images):
    client, _ = served
    good = upload_tasks(sample_images, 3)
    tasks = [good[0], {"id": 7, "data": {"image": "/data/upload/1/corrupt.png"}}, good[1],
             {"id": 8, "data": {"image": "http://127.0.0.1:9/gone.png"}}, {"id": 9, "data": {"other": "x"}}, good[2]]
    response = predict(client, tasks)
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == len(tasks)
    for i in (1, 3, 4):
        assert results[i]["result"] == [] and results[i]["score"] == UNREADABLE_PRIORITY
        assert results[i]["ale"]["error"]
    assert "not a decodable image" in results[1]["ale"]["error"]
    for i in (0, 2, 5):
        assert "error" not in results[i]["ale"] and results[i]["score"] < UNREADABLE_PRIORITY
    # the good tasks get the same predictions as when sent alone
    alone = predict(client, good).json["results"]
    assert [results[i]["ale"]["value"] for i in (0, 2, 5)] == pytest.approx([p["ale"]["value"] for p in alone])


def test_labels_are_mapped_and_unlabelled_classes_dropped(served, sample_images):
    client, _ = served
    only_circles = LABEL_CONFIG.replace('<Label value="box" predicted_values="square"/>', "")
    results = predict(client, upload_tasks(sample_images), only_circles).json["results"]
    labels = {r["value"]["rectanglelabels"][0] for p in results for r in p["result"]}
    assert labels <= {"Circle"}


def test_ale_counts_every_box_and_only_the_project_classes_certainty(served, sample_images):
    """The tiny model knows circle, square and triangle; the project has Circle and box (square), not triangle."""
    import cv2

    from ale_backend.detector import get_detector
    from ale_backend.scoring import score_image

    client, app_settings = served
    tasks = upload_tasks(sample_images)
    results = predict(client, tasks).json["results"]
    detector = get_detector(app_settings)
    expected = []
    for path in sample_images[:len(tasks)]:
        found = detector.detect([cv2.imread(str(path))])[0].above(app_settings.score_conf)
        columns = [i for i, name in detector.names.items() if name in ("circle", "square")]
        expected.append((score_image(found.class_scores[:, columns], "ale-unknown-mean"), len(found)))
    assert [p["ale"]["value"] for p in results] == pytest.approx([v for v, _ in expected], rel=1e-4)  # batch vs one
    assert [p["ale"]["detections"] for p in results] == [n for _, n in expected]
    # a triangle counts as a box the project has no class for: with it, no image scores as if it were known
    all_columns = [score_image(detector.detect([cv2.imread(str(p))])[0].above(app_settings.score_conf).class_scores,
                               "ale-unknown-mean") for p in sample_images[:len(tasks)]]
    assert sum(a > b + 1e-9 for a, b in zip([v for v, _ in expected], all_columns)) >= 1
    # a project none of whose labels the model has: every box fully unknown, ALE = sqrt(N)
    species = LABEL_CONFIG.replace('<Label value="Circle"/>', "").replace(
        '<Label value="box" predicted_values="square"/>', '<Label value="Mite"/>')
    unknown = predict(client, tasks, species).json["results"]
    assert [p["ale"]["value"] for p in unknown] == pytest.approx([n ** 0.5 for _, n in expected])
    assert all(p["result"] == [] for p in unknown)  # nothing shown: no class maps to a label


def test_an_entropy_strategy_on_a_one_class_project_scores_every_task_alike_and_says_so_once(served, sample_images,
                                                                                              caplog):
    """The project's classes are the only ones certainty is measured over: with one, entropy is 0 for every box."""
    _, app_settings = served
    entropy = dataclasses.replace(app_settings, strategy="ale-entropy-sum")
    client = create_app(entropy, warm_up=False).test_client()
    only_circles = LABEL_CONFIG.replace('<Label value="box" predicted_values="square"/>', "")
    tasks = upload_tasks(sample_images)
    with caplog.at_level("WARNING", logger="ale_backend.predictions"):
        first = predict(client, tasks, only_circles).json["results"]
        predict(client, tasks, only_circles)
    assert any(p["ale"]["detections"] for p in first) and all(p["ale"]["value"] == 0 for p in first)
    warnings = [r.getMessage() for r in caplog.records if "cannot rank this project" in r.getMessage()]
    assert len(warnings) == 1 and "ale-entropy-sum" in warnings[0] and "1 of the model's classes" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="ale_backend.predictions"):
        two = predict(client, tasks).json["results"]  # Circle and box: two classes, entropy ranks
    assert any(p["ale"]["value"] > 0 for p in two)
    assert not [r for r in caplog.records if "cannot rank" in r.getMessage()]


def test_a_version_pruned_while_a_request_runs_is_read_again_not_a_500(served, sample_images, trained_weights):
    """label-studio-ml builds the model (which reads the served version) before it predicts: a round that promotes
    a new version and prunes the old one in between must not fail the request."""
    import shutil

    from ale_backend.model import ALEModel
    from ale_backend.registry import Registry, VersionInfo

    _, app_settings = served
    registry = Registry(app_settings.model_dir)
    record = {"project": 1, "parent": "base", "class_names": ["circle", "square", "triangle"], "metrics": {},
              "annotations": 1, "boxes": 1, "train_seconds": 1.0, "promoted": True}
    registry.add(trained_weights, VersionInfo(version="p1-v1-a", created_at="2026-12-01T10:00:00+00:00", **record))
    model = ALEModel(label_config=LABEL_CONFIG, settings=app_settings, project="1.1700000000")
    assert model.model_version == "p1-v1-a"
    registry.add(trained_weights, VersionInfo(version="p1-v2-b", created_at="2026-12-01T11:00:00+00:00", **record))
    shutil.rmtree(registry.version_dir(1, "p1-v1-a"))  # pruned
    predictions = model.predict(upload_tasks(sample_images, 2))
    assert [p["model_version"] for p in predictions] == ["p1-v2-b"] * 2 and model.model_version == "p1-v2-b"


def test_the_controls_model_score_threshold_sets_what_is_shown_not_what_is_scored(served, sample_images):
    client, app_settings = served
    tasks = upload_tasks(sample_images)

    def with_threshold(value):
        config = LABEL_CONFIG.replace('toName="image"', f'toName="image" model_score_threshold="{value}"')
        return predict(client, tasks, config).json["results"]

    default = predict(client, tasks).json["results"]
    shown = sorted(r["score"] for p in default for r in p["result"])
    assert shown[0] < shown[-1]
    between = round((shown[0] + shown[-1]) / 2, 4)  # above some of the boxes shown by default, whatever the model
    strict, loose = with_threshold(between), with_threshold(0.01)
    scores = {name: [r["score"] for p in results for r in p["result"]]
              for name, results in (("default", default), ("strict", strict), ("loose", loose))}
    assert min(scores["default"]) >= app_settings.display_conf and min(scores["strict"]) >= between
    assert min(scores["loose"]) < min(app_settings.display_conf, app_settings.score_conf)  # below what is scored
    assert len(scores["strict"]) < len(scores["default"]) < len(scores["loose"])
    for results in (strict, loose):
        assert [p["ale"] for p in results] == [p["ale"] for p in default]


@pytest.mark.parametrize(
    "kwargs, status, reason",
    [
        ({"data": "{not json", "content_type": "application/json"}, 400, "JSON object"),
        ({"data": "tasks=1", "content_type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
        ({"json": [1, 2]}, 400, "JSON object"),
        ({"json": {"tasks": [], "label_config": LABEL_CONFIG}}, 400, "'tasks'"),
        ({"json": {"tasks": [1], "label_config": LABEL_CONFIG}}, 400, "not JSON objects"),
        ({"json": {"tasks": [{"data": {}}]}}, 400, "'label_config'"),
        ({"json": {"tasks": [{"data": {}}], "label_config": "<View/>"}}, 400, "RectangleLabels"),
        ({"json": {"tasks": [{"data": {}}], "label_config": LABEL_CONFIG.replace(
            'toName="image"', 'toName="image" model_score_threshold="high"')}}, 400, "model_score_threshold"),
    ],
)
def test_bad_predict_requests_get_a_4xx_with_a_reason(served, kwargs, status, reason):
    client, _ = served
    response = client.post("/predict", **kwargs)
    assert response.status_code == status
    assert reason in response.json["error"]


def test_setup_refuses_a_config_without_rectangle_labels(served):
    client, _ = served
    response = client.post("/setup", json={"project": "1.1", "schema": '<View><Image name="i" value="$i"/></View>'})
    assert response.status_code == 400 and "RectangleLabels" in response.json["error"]


def test_versions_answers_get_and_post(served):
    client, app_settings = served
    version = resolve_model_source(app_settings).version
    assert client.get("/versions").json["versions"] == [version]
    assert client.post("/versions", json={"project": "1.1"}).json["versions"] == [version]


def test_a_damaged_served_version_gives_way_and_every_route_says_why(served, sample_images, trained_weights):
    from ale_backend.registry import Registry, VersionInfo

    client, app_settings = served
    registry = Registry(app_settings.model_dir)
    record = dict(project=1, parent="base", class_names=["circle", "square", "triangle"], metrics={}, annotations=1,
                  boxes=1, train_seconds=1.0, promoted=True)
    registry.add(trained_weights, VersionInfo(version="p1-v1-a", created_at="2026-12-01T10:00:00+00:00", **record))
    registry.add(trained_weights, VersionInfo(version="p1-v2-b", created_at="2026-12-01T11:00:00+00:00", **record))
    weights = registry.weights(1, "p1-v2-b")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated on disk
    setup = client.post("/setup", json={"project": "1.1", "schema": LABEL_CONFIG})
    assert setup.status_code == 200 and setup.json["model_version"] == "p1-v1-a"
    response = predict(client, upload_tasks(sample_images, 2))
    assert response.status_code == 200 and {p["model_version"] for p in response.json["results"]} == {"p1-v1-a"}
    shown = client.get("/status?project=1").json
    assert shown["current_version"] == "p1-v1-a"
    assert shown["serving_problem"].startswith("version p1-v2-b's weights are ") and "serving p1-v1-a" in \
        shown["serving_problem"]
    assert 'ale_serving_problem{project="1"} 1.0' in client.get("/metrics").get_data(as_text=True)
    assert [v for v in client.get("/versions?project=1").json["versions"]][1:] == ["p1-v1-a", "p1-v2-b"]


def test_a_large_non_square_image_is_shrunk_and_its_regions_keep_its_own_proportions(served, image_server,
                                                                                      sample_images):
    """The image is 4 times the model's size and twice as wide as high: the regions (percent of the original) are
    those of a detection on the full image, and the size sent to Label Studio is the original's."""
    import cv2

    from ale_backend.detector import get_detector

    client, app_settings = served
    small = cv2.imread(str(sample_images[0]))
    wide = cv2.resize(cv2.copyMakeBorder(small, 0, 0, 0, 160, cv2.BORDER_REPLICATE), (1280, 640),
                      interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(image_server.root / "1" / "wide.png"), wide)
    (prediction,) = predict(client, [{"id": 5, "data": {"image": "/data/upload/1/wide.png"}}]).json["results"]
    full = get_detector(app_settings).detect([wide])[0].above(app_settings.display_conf)
    regions = prediction["result"]
    assert regions and len(regions) == len(full)
    for region, box in zip(sorted(regions, key=lambda r: r["value"]["x"]), sorted(full.boxes, key=lambda b: b[0])):
        assert (region["original_width"], region["original_height"]) == (1280, 640)
        value = region["value"]
        assert value["x"] == pytest.approx(100 * box[0] / 1280, abs=1.0)
        assert value["y"] == pytest.approx(100 * box[1] / 640, abs=1.0)
        assert value["width"] == pytest.approx(100 * (box[2] - box[0]) / 1280, abs=1.0)
        assert value["height"] == pytest.approx(100 * (box[3] - box[1]) / 640, abs=1.0)
    assert all(r["value"]["x"] + r["value"]["width"] <= 50.5 for r in regions)  # the shapes are in the left half

"""The detector on a real (tiny) YOLOv5 trained on generated shapes."""

import dataclasses
import shutil

import cv2
import numpy as np
import pytest
import torch

from ale_backend.detector import get_detector
from ale_backend.model_source import ModelNotFoundError, local_model_source, resolve_model_source
from ale_backend.ultralytics_setup import ultralytics_module


@pytest.fixture(scope="module")
def images(sample_images):
    return [cv2.imread(str(p)) for p in sample_images]


def test_the_tiny_model_finds_the_shapes(settings, images):
    detector = get_detector(settings)
    assert detector.names == {0: "circle", 1: "square", 2: "triangle"}
    detections = detector.detect(images)
    assert len(detections) == len(images)
    assert sum(len(d.above(0.25)) for d in detections) >= len(images) // 2


def test_class_score_vectors_match_the_boxes(settings, images):
    for d in get_detector(settings).detect(images):
        assert d.class_scores.shape == (len(d), 3)
        if len(d):
            np.testing.assert_allclose(d.class_scores.max(axis=1), d.confidences, rtol=1e-6)
            np.testing.assert_array_equal(d.class_scores.argmax(axis=1), d.class_ids)
            assert (d.class_scores >= 0).all() and (d.class_scores <= 1).all()


def test_boxes_are_those_of_plain_ultralytics_predict(settings, images, trained_weights):
    ours = get_detector(settings).detect(images)
    plain = ultralytics_module(settings.model_dir).YOLO(str(trained_weights)).predict(
        images, conf=settings.inference_conf, iou=settings.score_iou, max_det=settings.score_max_det,
        agnostic_nms=settings.agnostic_nms, imgsz=settings.imgsz, device="cpu", verbose=False,
    )
    assert sum(len(d) for d in ours) > 0
    for mine, theirs in zip(ours, plain):
        np.testing.assert_allclose(mine.boxes, theirs.boxes.xyxy.numpy(), atol=1e-4)
        np.testing.assert_allclose(mine.confidences, theirs.boxes.conf.numpy(), atol=1e-6)
        np.testing.assert_array_equal(mine.class_ids, theirs.boxes.cls.numpy().astype(int))
        assert (mine.width, mine.height) == (theirs.orig_shape[1], theirs.orig_shape[0])


def test_batches_give_the_same_result_as_one_call(settings, images):
    whole = get_detector(settings).detect(images)
    small = get_detector(dataclasses.replace(settings, inference_batch=3)).detect(images)
    for a, b in zip(whole, small):
        np.testing.assert_allclose(a.confidences, b.confidences, atol=1e-5)


def test_each_image_carries_what_it_looks_like_to_the_backbone_from_the_same_pass(settings, images):
    """Detections.features: the SPPF output averaged over positions, one vector per image, the same whichever batch
    the image came in (the sample images share one size), alike for an image and its copy, and unlike another."""
    whole = get_detector(settings).detect(images)
    small = get_detector(dataclasses.replace(settings, inference_batch=3)).detect(images)
    sppf = ultralytics_module(settings.model_dir).YOLO(settings.model_path).model.model[9]
    width = sppf.cv2.conv.out_channels
    for a, b in zip(whole, small):
        assert a.features.shape == (width,) and np.isfinite(a.features).all()
        np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)
        assert a.above(0.9).features is a.features
    again = get_detector(settings).detect([images[0], images[1], images[0].copy()])
    np.testing.assert_allclose(again[0].features, again[2].features, rtol=1e-5)
    assert np.abs(again[0].features - again[1].features).max() > 1e-3


def test_weights_are_loaded_once_per_process(settings):
    assert get_detector(settings) is get_detector(dataclasses.replace(settings))


def test_replaced_weights_load_anew_with_a_new_version(settings, trained_weights, tmp_path):
    path = tmp_path / "mine.pt"
    shutil.copyfile(trained_weights, path)
    first = get_detector(dataclasses.replace(settings, model_path=str(path)))
    assert first.version.startswith("mine-") and len(first.version) == len("mine-") + 10
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data) + b"\0")  # a different file (torch ignores trailing bytes)
    second = get_detector(dataclasses.replace(settings, model_path=str(path)))
    assert second is not first and second.version != first.version


def test_untrained_configs_are_deterministic_across_loads(settings, images):
    config = dataclasses.replace(settings, model_path="yolov5nu.yaml", score_conf=0.0001, display_conf=0.0001)
    detector = get_detector(config)
    assert detector.version == "yolov5nu-untrained" and len(detector.names) == 80
    first = detector.detect(images[:2])
    rebuilt = type(detector)(detector.source, config).detect(images[:2])
    for a, b in zip(first, rebuilt):
        np.testing.assert_allclose(a.confidences, b.confidences)


@pytest.mark.parametrize("name, reason", [
    ("missing.pt", "weights file not found"),
    ("yolov5n.pt", "rename the file"),
])
def test_local_model_paths_that_cannot_be_loaded_are_refused(tmp_path, name, reason):
    path = tmp_path / name
    if name == "yolov5n.pt":
        path.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=reason):
        local_model_source(str(path))


def test_unknown_model_config_is_refused(settings):
    with pytest.raises(ModelNotFoundError, match="not a model config"):
        get_detector(dataclasses.replace(settings, model_path="no-such-model.yaml"))


@pytest.mark.parametrize("threads", [1, 0])
def test_inference_computes_on_the_configured_cpu_threads(settings, images, threads):
    # ultralytics alone resets torch to min(8, cores - 1) threads whenever it selects the CPU: one on 2 cores
    import torch

    from ale_backend.detector import Detector
    from ale_backend.ultralytics_setup import cpu_cores

    before = torch.get_num_threads()
    try:
        Detector(resolve_model_source(settings), dataclasses.replace(settings, torch_threads=threads)
                 ).detect(images[:1])
        assert torch.get_num_threads() == (threads or cpu_cores())
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 inference runs on CUDA only (no GPU here)")
def test_half_precision_gives_the_fp32_boxes_and_scores(settings, images):
    from ale_backend.scoring import score_image

    fp32 = get_detector(dataclasses.replace(settings, device="0")).detect(images)
    fp16 = get_detector(dataclasses.replace(settings, device="0", inference_half=True)).detect(images)
    for full, half in zip(fp32, fp16):
        assert len(full) == len(half)
        np.testing.assert_allclose(half.boxes, full.boxes, atol=1.0)  # pixels
        np.testing.assert_allclose(half.class_scores, full.class_scores, atol=0.01)
        for strategy in ("ale-unknown-mean", "ale-entropy-sum"):
            assert score_image(half.class_scores, strategy) == pytest.approx(score_image(full.class_scores, strategy),
                                                                             abs=0.02)


def test_half_precision_is_ignored_on_the_cpu(settings, images):
    fp32 = get_detector(settings).detect(images)
    asked = get_detector(dataclasses.replace(settings, inference_half=True)).detect(images)
    for full, half in zip(fp32, asked):
        np.testing.assert_array_equal(half.boxes, full.boxes)
        np.testing.assert_array_equal(half.class_scores, full.class_scores)

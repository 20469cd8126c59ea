"""The benchmark's synthetic "new species" data set."""

import hashlib

import numpy as np
import pytest
import yaml

from benchmarks.active_learning.newspecies import CLASS_NAMES, GeneratedDigits, NewSpeciesConfig, generate

SMALL = NewSpeciesConfig(seed=3, counts={"base": 30, "val": 10, "pool": 60, "test": 20})


def digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in {".png", ".txt"}:
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def rows(root, split):
    return {p.stem: [list(map(float, line.split())) for line in p.read_text().splitlines()]
            for p in sorted((root / split / "labels").glob("*.txt"))}


def test_a_seed_gives_the_same_data_set(tmp_path):
    generate(SMALL, tmp_path / "a")
    generate(SMALL, tmp_path / "b")
    generate(NewSpeciesConfig(seed=4, counts=SMALL.counts), tmp_path / "c")
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_labels_match_their_images(tmp_path):
    stats = generate(SMALL, tmp_path)
    for split, count in SMALL.counts.items():
        labels = rows(tmp_path, split)
        images = sorted((tmp_path / split / "images").glob("*.png"))
        assert [p.stem for p in images] == list(labels) and len(images) == count
        assert sum(len(r) for r in labels.values()) == sum(k * v for k, v in stats[split]["objects_per_image"].items())
        for boxes in labels.values():
            assert boxes, "every image has at least one object"
            xyxy = [(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2) for _, cx, cy, w, h in boxes]
            assert all(0 <= a and a < c <= 1 and 0 <= b and b < d <= 1 for a, b, c, d in xyxy)
            for i, p in enumerate(xyxy):  # objects never overlap
                for q in xyxy[i + 1:]:
                    assert p[2] <= q[0] + 1e-6 or q[2] <= p[0] + 1e-6 or p[3] <= q[1] + 1e-6 or q[3] <= p[1] + 1e-6
    data = yaml.safe_load((tmp_path / "data.yaml").read_text())
    assert data["names"] == dict(enumerate(CLASS_NAMES))


def test_new_classes_stay_out_of_the_base_model_data_and_are_a_minority_of_the_pool(tmp_path):
    stats = generate(SMALL, tmp_path)
    data = GeneratedDigits(SMALL).write(SMALL.seed, tmp_path)
    for split in ("base", "val"):
        assert not {int(r[0]) for boxes in rows(tmp_path, split).values() for r in boxes} & set(SMALL.new_classes)
        assert stats[split]["images_with_new_classes"] == 0
    assert 0 < stats["pool"]["images_with_new_classes"] < SMALL.counts["pool"] / 2
    base = data.write_base_yaml()
    names = yaml.safe_load(base.read_text())["names"]
    assert list(names.values()) == [CLASS_NAMES[c] for c in SMALL.known_classes]
    known_rows = rows(tmp_path / "base-known", "base")
    assert {int(r[0]) for boxes in known_rows.values() for r in boxes} <= set(range(len(SMALL.known_classes)))


def test_the_pool_follows_the_configured_objects_per_image(tmp_path):
    config = NewSpeciesConfig(seed=1, counts={"pool": 600})
    stats = generate(config, tmp_path)["pool"]["objects_per_image"]
    shares = np.array([stats.get(k, 0) for k in (1, 2, 3, 4)]) / 600
    np.testing.assert_allclose(shares, config.objects_per_image, atol=0.05)


def test_the_base_split_follows_its_own_objects_per_image(tmp_path):
    config = NewSpeciesConfig(seed=2, counts={"base": 400, "pool": 400},
                              base_objects_per_image=(0.0, 0.1, 0.2, 0.3, 0.2, 0.2))
    stats = generate(config, tmp_path)
    for split, expected in (("base", config.base_objects_per_image), ("pool", config.objects_per_image)):
        shares = np.array([stats[split]["objects_per_image"].get(k, 0) for k in range(1, len(expected) + 1)]) / 400
        np.testing.assert_allclose(shares, expected, atol=0.05)


def test_the_base_yaml_refuses_new_classes_in_known_splits(tmp_path):
    data = GeneratedDigits(SMALL).write(SMALL.seed, tmp_path)
    label = next((tmp_path / "base" / "labels").glob("*.txt"))
    label.write_text("3 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match="new-class object"):
        data.write_base_yaml()


def test_new_class_validation_images_join_the_split_without_changing_what_the_base_model_sees(tmp_path):
    with_new = NewSpeciesConfig(seed=3, counts=SMALL.counts, val_new_images=5)
    plain = GeneratedDigits(SMALL).write(3, tmp_path / "plain")
    data = GeneratedDigits(with_new).write(3, tmp_path / "new")
    labels = rows(tmp_path / "new", "val")
    assert list(labels)[-5:] == [f"val_new_{i:05d}" for i in range(5)]
    assert all(any(int(r[0]) in with_new.new_classes for r in labels[f"val_new_{i:05d}"]) for i in range(5))
    assert {stem: r for stem, r in labels.items() if not stem.startswith("val_new")} == rows(tmp_path / "plain", "val")
    assert data.counts()["val"]["new_images"] == 5 and plain.counts()["val"]["new_images"] == 0
    for seed_data in (plain, data):  # the base model is validated on the same known-only images either way
        seed_data.write_base_yaml()
    assert digest(tmp_path / "new" / "base-known") == digest(tmp_path / "plain" / "base-known")
    assert digest(tmp_path / "new" / "pool") == digest(tmp_path / "plain" / "pool")

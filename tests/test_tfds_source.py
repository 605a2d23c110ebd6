"""The TFDS input path of router training: a tiny dataset prepared here in both file formats, read back."""

import numpy as np
import pytest
from PIL import Image

from l2c_jax.errors import ConfigError
from l2c_jax.training.data import Batches, TfdsSource, center_crop_arr, make_source

N, H, W = 10, 20, 24


def _examples():
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), i % 3) for i in range(N)]


def _prepare(data_dir, file_format):
    """Writes the examples as a prepared TFDS dataset, as `tfds build` would; returns its name."""
    import tensorflow_datasets as tfds

    name = f"l2c_jax_test_{file_format}"
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version="1.0.0", data_dir=str(data_dir), file_format=file_format,
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(H, W, 3)),
                                             "label": tfds.features.ClassLabel(num_classes=3)}),
        split_datasets={"train": [(i, {"image": img, "label": y}) for i, (img, y) in enumerate(_examples())]})
    return name


def _expected(size):
    return {center_crop_arr(Image.fromarray(img), size).tobytes(): label for img, label in _examples()}


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_tfds_source_reads_every_example_and_resumes(tmp_path, file_format):
    # array_record files are read by index (tfds.data_source); tfrecord ones replayed in file order.
    src = TfdsSource(_prepare(tmp_path, file_format), "train", 16, data_dir=str(tmp_path))
    assert len(src) == N and src.random_access == (file_format == "array_record")
    expected = _expected(16)
    if src.random_access:
        seen = [src.load(i) for i in range(N)]
    else:
        seen = list(src.sequential(0))
        assert [x.tobytes() for x, _ in list(src.sequential(3))] == [x.tobytes() for x, _ in seen[3:]]
    assert len(seen) == N and all(x.shape == (16, 16, 3) and x.dtype == np.uint8 for x, _ in seen)
    assert {x.tobytes(): y for x, y in seen} == expected  # every example once, with its label

    # A resumed loader continues with the batches an uninterrupted one gives.
    ref = Batches(src, batch_size=3, seed=1)
    want = [next(ref) for _ in range(5)]  # crosses an epoch boundary (10 // 3 = 3 batches per epoch)
    b = Batches(src, batch_size=3, seed=1)
    next(b), next(b)
    state = b.state()
    resumed = Batches(src, batch_size=3, seed=1)
    resumed.restore(state)
    for w in want[2:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["images"], w["images"])
        np.testing.assert_array_equal(got["y"], w["y"])
    assert want[0]["images"].shape == (3, 16, 16, 3) and want[0]["images"].min() >= -1 and want[0]["images"].max() <= 1


def test_make_source_names_tfds_and_refuses_unknown(tmp_path):
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(tfds_name=_prepare(tmp_path, "array_record"), split="train",
                                         tfds_data_dir=str(tmp_path)))
    assert len(make_source(cfg, 8)) == N
    cfg.tfds_name = "no_such_dataset_l2c"
    with pytest.raises(ConfigError, match="no_such_dataset_l2c") as e:
        make_source(cfg, 8)
    assert "\n" not in str(e.value)

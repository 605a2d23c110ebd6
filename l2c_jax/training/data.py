"""Training inputs: images (an image folder or a TFDS dataset), precomputed latents, or the
model's own sampling trajectories (image-free router training, `l2c_jax.training.trajectories`).

Every source is random-access or replayable, and the iterator's position is a
small dict (`epoch`, `pos`) saved with each checkpoint, so a resumed run sees
the same batches it would have seen. Images get the ADM center crop, a
random horizontal flip, and [-1, 1] scaling, as the original trains; VAE
encoding happens on the device inside the training step.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import numpy as np

from l2c_jax.errors import ConfigError
from l2c_jax.training.digits import load_digits_u8
from l2c_jax.training.trajectories import TrajectorySource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM's center crop: halve with BOX while large, BICUBIC resize, crop the middle."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y0 = (arr.shape[0] - image_size) // 2
    x0 = (arr.shape[1] - image_size) // 2
    return arr[y0:y0 + image_size, x0:x0 + image_size]


def to_model_range(arr_u8: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    return arr_u8.astype(np.float32) / 127.5 - 1.0


class ImageFolder:
    """`root/<class>/*.jpg`, classes in sorted order (torchvision's ImageFolder layout)."""

    def __init__(self, root: str, image_size: int):
        if not os.path.isdir(root):
            raise ConfigError(f"data.image_folder {root!r} is not a directory")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise ConfigError(f"{root}: no class sub-directories (expected root/<class>/<image>)")
        self.items = []
        for label, c in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
                for f in sorted(files):
                    if f.endswith(IMAGE_EXTENSIONS) or f.lower().endswith(IMAGE_EXTENSIONS):
                        self.items.append((os.path.join(dirpath, f), label))
        if not self.items:
            raise ConfigError(f"{root}: no images found")
        self.image_size = image_size
        self.kind = "images"

    def __len__(self):
        return len(self.items)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        from PIL import Image

        path, label = self.items[index]
        try:
            with Image.open(path) as im:
                arr = center_crop_arr(im.convert("RGB"), self.image_size)
        except OSError as e:
            raise ConfigError(f"{path}: unreadable image ({e})") from None
        return arr, label


class ArraySource:
    """In-memory uint8 images (N, H, W, C) with labels; used for small bundled datasets."""

    def __init__(self, images_u8: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images_u8, np.asarray(labels, np.int64)
        self.kind = "images"

    def __len__(self):
        return len(self.images)

    def load(self, index: int):
        return self.images[index], int(self.labels[index])


class LatentFolder:
    """Latents written by scripts/extract_latents.py: `moments.npy` (N, h, w, 2C) + `labels.npy`.

    The moments are the encoder's (mean, logvar); training samples the
    posterior on the device, so every epoch sees fresh latents.
    """

    def __init__(self, directory: str):
        meta_path = os.path.join(directory, "latents.json")
        if not os.path.isfile(meta_path):
            raise ConfigError(f"{directory}: no latents.json (write it with scripts/extract_latents.py)")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.moments = np.load(os.path.join(directory, "moments.npy"), mmap_mode="r")
        self.labels = np.load(os.path.join(directory, "labels.npy"))
        if len(self.moments) != len(self.labels):
            raise ConfigError(f"{directory}: {len(self.moments)} latents but {len(self.labels)} labels")
        self.kind = "moments"

    def __len__(self):
        return len(self.labels)

    def load(self, index: int):
        return np.asarray(self.moments[index], np.float32), int(self.labels[index])


class TfdsSource:
    """A TFDS image-classification dataset (e.g. `imagenet2012`, whose manual dir holds the tars).

    Read in a fixed order into memory-light random access through
    `tfds.data_source` when the dataset is prepared in array_record format,
    else replayed sequentially with tf.data (resume then skips ahead).
    """

    def __init__(self, name: str, split: str, image_size: int, data_dir: Optional[str] = None,
                 manual_dir: Optional[str] = None):
        import tensorflow_datasets as tfds

        self.image_size = image_size
        self.kind = "images"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
            if manual_dir or not builder.is_prepared():
                dl = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
                builder.download_and_prepare(download_config=dl)
        except Exception as e:  # tfds raises many types; one line is what the user needs
            raise ConfigError(f"TFDS dataset {name!r}: {' '.join(str(e).split())[:300]}") from None
        self.builder, self.split = builder, split
        self._n = builder.info.splits[split].num_examples
        feats = builder.info.features
        self._image_key = "image" if "image" in feats else next(iter(feats))
        self._label_key = "label" if "label" in feats else None
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception:
            self._source = None  # tfrecord-prepared: sequential replay below

    def __len__(self):
        return self._n

    def load(self, index: int):
        from PIL import Image

        ex = self._source[index]
        img = ex[self._image_key]
        arr = center_crop_arr(Image.fromarray(np.asarray(img)).convert("RGB"), self.image_size)
        return arr, int(ex[self._label_key]) if self._label_key else 0

    @property
    def random_access(self) -> bool:
        return self._source is not None

    def sequential(self, start: int) -> Iterator:
        """Examples in file order from `start` on, without random access."""
        import tensorflow_datasets as tfds
        from PIL import Image

        ds = self.builder.as_dataset(split=self.split, shuffle_files=False)
        for ex in tfds.as_numpy(ds.skip(start)):
            arr = center_crop_arr(Image.fromarray(ex[self._image_key]).convert("RGB"), self.image_size)
            yield arr, int(ex[self._label_key]) if self._label_key else 0


class Batches:
    """Shuffled, flipped, fixed-size batches with a resumable position.

    The order of epoch e is a permutation seeded by (seed, e); the flip of
    each example is drawn from (seed, e, index). `state()` / `restore()` give
    and take {"epoch", "pos"}. `batch_size` is the global batch; with several
    processes each loads only its own part of it (process p: rows
    p*B/P..(p+1)*B/P), which `jax.make_array_from_process_local_data` joins
    into the global batch, the same batch a one-process run reads.
    """

    def __init__(self, source, batch_size: int, seed: int = 0, flip: bool = True, workers: int = 8,
                 process_index: int = 0, process_count: int = 1):
        if batch_size > len(source):
            raise ConfigError(f"batch size {batch_size} exceeds the {len(source)} examples of the dataset")
        if batch_size % process_count:
            raise ConfigError(f"train.batch_size {batch_size} is not divisible by {process_count} processes")
        self.source, self.batch_size, self.seed, self.flip = source, batch_size, seed, flip
        self.local_batch = batch_size // process_count
        self._first = process_index * self.local_batch  # this process's rows of each global batch
        self.epoch, self.pos = 0, 0
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._seq = None

    def state(self) -> dict:
        return {"epoch": int(self.epoch), "pos": int(self.pos)}

    def restore(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._seq = None

    def _order(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.source))

    def _fetch(self, idx: int):
        x, y = self.source.load(idx)
        if self.flip and self.source.kind == "images":
            if np.random.default_rng([self.seed, self.epoch, idx]).random() < 0.5:
                x = x[:, ::-1]
        return x, y

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        n = len(self.source)
        if self.pos + self.batch_size > n:  # drop_last, as the original's loader
            self.epoch, self.pos = self.epoch + 1, 0
            self._seq = None
        sequential = getattr(self.source, "random_access", True) is False
        if sequential:
            # No random access (tfrecord TFDS): file order, replayed from the position.
            if self._seq is None:
                self._seq = self.source.sequential(self.pos)
            # Every process replays the stream; each keeps its own rows.
            items = []
            for k in range(self.batch_size):
                x, y = next(self._seq)
                if self._first <= k < self._first + self.local_batch:
                    if self.flip and np.random.default_rng([self.seed, self.epoch, self.pos + k]).random() < 0.5:
                        x = x[:, ::-1]
                    items.append((x, y))
        else:
            start = self.pos + self._first
            idx = self._order()[start:start + self.local_batch]
            items = list(self._pool.map(self._fetch, idx))
        self.pos += self.batch_size
        xs = np.stack([np.ascontiguousarray(x) for x, _ in items])
        ys = np.asarray([y for _, y in items], np.int32)
        if self.source.kind == "images":
            return {"images": to_model_range(xs), "y": ys}
        if self.source.kind == "trajectories":
            return {"states": xs.astype(np.float32), "y": ys}
        return {"moments": xs.astype(np.float32), "y": ys}


def data_config(image_size: int, **overrides):
    """The `data` section of a training config: every key `make_source` and `Batches` read, empty by default."""
    import ml_collections

    c = dict(
        image_folder="",            # root/<class>/*.JPEG, e.g. ImageNet train (classes in sorted order)
        tfds_name="",               # or a TFDS dataset such as "imagenet2012"
        split="train",
        tfds_data_dir="",
        manual_dir="",              # imagenet2012: the directory holding ILSVRC2012_img_train.tar
        latents="",                 # or latents from scripts/extract_latents.py
        image_size=image_size,
        flip=True,
        # Image-free router training: the model's own full-sampler trajectories instead of a dataset,
        # recorded into this directory ("workdir": WORKDIR/trajectories) on first use, then reused.
        trajectories="",
        num_trajectories=2048,      # trajectories recorded (each holds every step's state)
        trajectory_seed=0,          # trajectory i's noise and label come from (seed, i)
        # Guidance while recording (None: none, as the router loss itself runs the model).
        trajectory_cfg_scale=ml_collections.config_dict.placeholder(float),
        trajectory_batch_size=64,
    )
    unknown = set(overrides) - set(c)
    if unknown:
        raise ConfigError(f"unknown data keys: {', '.join(sorted(unknown))}")
    c.update(overrides)
    return ml_collections.ConfigDict(c)


def make_source(data_config, image_size: int, trajectories: Optional[str] = None):
    """The source the config names: data.latents, data.image_folder or data.tfds_name
    ("sklearn_digits" names the bundled 8x8 digits), or with data.trajectories the
    recorded trajectories in `trajectories` (the directory it resolves to)."""
    if data_config.get("trajectories"):
        if not trajectories:
            raise ConfigError("data.trajectories is set: record the trajectories first (train_router does)")
        return TrajectorySource(trajectories)
    if data_config.get("latents"):
        return LatentFolder(data_config.latents)
    if data_config.get("image_folder"):
        return ImageFolder(data_config.image_folder, image_size)
    if data_config.get("tfds_name") == "sklearn_digits":
        return ArraySource(*load_digits_u8())
    if data_config.get("tfds_name"):
        return TfdsSource(data_config.tfds_name, data_config.get("split", "train"), image_size,
                          data_config.get("tfds_data_dir") or None, data_config.get("manual_dir") or None)
    raise ConfigError("set one of data.latents, data.image_folder or data.tfds_name")

"""The ADM evaluator in-tree: sample and reference npz files -> IS, FID, sFID, precision, recall.

    metrics = evaluate("samples.npz", "VIRTUAL_imagenet256_labeled.npz", "ckpt/inception_fid")

Both files hold `arr_0`, uint8 images (N, H, W, 3), as openai/guided-diffusion's
`evaluations/evaluator.py` reads them. Images go through the same preprocessing
as that evaluator's TF graph: float [0, 255], TF1 legacy bilinear resize to
299x299, `(x - 128) / 128`, then pytorch-fid's port of the same Inception-v3
(`l2c_jax.eval.inception`). The arrays are streamed from the zip in batches,
so a 50k-image file is never held whole.

Reference statistics: `mu`, `sigma`, `mu_s`, `sigma_s` stored in the reference
npz are used when present (as the evaluator does); precision / recall need
the reference pool features as well, so those (and the statistics, when the
file lacks them) are computed once and cached beside the reference as
`<name>.l2c_stats.npz`, keyed to the reference file's size and mtime and to
the network's weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from typing import Any, Dict, Iterator, Optional

import numpy as np

from l2c_jax.errors import ConfigError
from l2c_jax.eval import adm

log = logging.getLogger(__name__)

IMAGE_SIZE = 299
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
CACHE_SUFFIX = ".l2c_stats.npz"
# Bumped when the cached features would change (preprocessing, feature definition).
CACHE_VERSION = 1


class NpzImages:
    """`arr_0` of an npz file, checked up front (uint8, N x H x W x 3) and read in batches."""

    def __init__(self, path: str, what: str = "samples"):
        self.path, self.what = path, what
        if not os.path.isfile(path):
            raise ConfigError(f"{what} file not found: {path}")
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                if "arr_0.npy" not in names:
                    keys = ", ".join(n[:-4] for n in names if n.endswith(".npy")) or "nothing"
                    raise ConfigError(f"{what} file {path}: no 'arr_0' image array (it holds: {keys})")
                with zf.open("arr_0.npy") as f:
                    header = _read_npy_header(f)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise ConfigError(f"{what} file {path}: not a readable .npz file "
                              f"({' '.join(str(e).split()) or type(e).__name__})") from None
        shape, fortran, dtype = header if header else (None, False, None)
        if header is None:  # a header format this reader does not parse: let NumPy load it whole
            arr = self._load_whole()
            shape, dtype = arr.shape, arr.dtype
        if dtype != np.uint8:
            raise ConfigError(f"{what} file {path}: arr_0 has dtype {dtype}, expected uint8 images in [0, 255]")
        if len(shape) != 4 or shape[-1] != 3 or min(shape[1:3], default=0) < 1:
            raise ConfigError(f"{what} file {path}: arr_0 has shape {tuple(shape)}, expected (N, H, W, 3)")
        if shape[0] == 0:
            raise ConfigError(f"{what} file {path}: arr_0 holds no images")
        self.shape = tuple(int(s) for s in shape)
        # Fortran order cannot be streamed row by row; such files are small in practice.
        self._whole = self._load_whole() if (fortran or header is None) else None

    def __len__(self) -> int:
        return self.shape[0]

    def _load_whole(self) -> np.ndarray:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                return np.ascontiguousarray(z["arr_0"])
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise ConfigError(f"{self.what} file {self.path}: cannot read arr_0 "
                              f"({' '.join(str(e).split())})") from None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if self._whole is not None:
            for i in range(0, len(self), batch_size):
                yield self._whole[i:i + batch_size]
            return
        per_image = int(np.prod(self.shape[1:]))
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
                _read_npy_header(f)
                for i in range(0, len(self), batch_size):
                    n = min(batch_size, len(self) - i)
                    data = f.read(n * per_image)
                    if len(data) != n * per_image:
                        raise ValueError(f"truncated: image {i + len(data) // per_image} of {len(self)} is cut off")
                    yield np.frombuffer(data, np.uint8).reshape((n,) + self.shape[1:])
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise ConfigError(f"{self.what} file {self.path}: cannot read arr_0 ({' '.join(str(e).split())})") from None


def _read_npy_header(f):
    """(shape, fortran_order, dtype) of an .npy stream, or None for a header version we do not parse."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


def _preprocess_fn():
    import jax

    from l2c_jax.eval.resize import resize_bilinear_legacy

    @jax.jit
    def preprocess(images_u8):
        # The evaluator's graph: uint8 fed as float [0, 255], legacy bilinear to 299, (x - 128) / 128.
        x = resize_bilinear_legacy(images_u8.astype(jax.numpy.float32), IMAGE_SIZE)
        return (x - 128.0) / 128.0

    return preprocess


def compute_features(net, images: NpzImages, batch_size: int = 64, progress: bool = True,
                     desc: Optional[str] = None) -> Dict[str, np.ndarray]:
    """{"pool": (N, 2048), "spatial": (N, 2023)} float32 Inception features of every image."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    preprocess = _preprocess_fn()
    pool, spatial = [], []
    with tqdm(total=len(images), desc=desc or images.what, unit="img", disable=not progress) as bar:
        for batch in images.batches(batch_size):
            n = len(batch)
            if n < batch_size:  # pad the last batch so that one shape is compiled
                batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
            out = net.features(preprocess(batch))
            pool.append(np.asarray(out["pool"], np.float32)[:n].reshape(n, -1))
            spatial.append(np.asarray(out["spatial"], np.float32)[:n].reshape(n, -1))
            bar.update(n)
    return {"pool": np.concatenate(pool), "spatial": np.concatenate(spatial)}


def network_fingerprint(net) -> str:
    """A digest of the classifier weights: a cache written with another network is not reused."""
    return hashlib.sha256(np.ascontiguousarray(net.fc_weight, np.float32).tobytes()).hexdigest()


def cache_path(reference_path: str) -> str:
    base = reference_path[:-4] if reference_path.endswith(".npz") else reference_path
    return base + CACHE_SUFFIX


def _cache_key(reference_path: str, net) -> Dict[str, Any]:
    st = os.stat(reference_path)
    return {"cache_version": CACHE_VERSION, "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns,
            "network": network_fingerprint(net)}


def _read_cache(path: str, key: Dict[str, Any]) -> Optional[Dict[str, np.ndarray]]:
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if any(k not in z or z[k].item() != v for k, v in key.items()):
                log.info("reference cache %s is stale; recomputing", path)
                return None
            return {k: z[k] for k in ("pool",) + STATS_KEYS}
    except (ValueError, OSError, KeyError, zipfile.BadZipFile, EOFError) as e:
        # A damaged cache only costs a recomputation.
        log.warning("ignoring unreadable reference cache %s: %s", path, e)
        return None


def _write_cache(path: str, key: Dict[str, Any], ref: Dict[str, np.ndarray]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # a file object, so np.savez does not append another ".npz"
            np.savez(f, **{k: ref[k] for k in ("pool",) + STATS_KEYS}, **{k: np.asarray(v) for k, v in key.items()})
        os.replace(tmp, path)  # readers never see a half-written cache
    except OSError as e:  # a read-only reference folder: evaluate anyway, just without the cache
        log.warning("could not write the reference cache %s: %s", path, e)
        if os.path.exists(tmp):
            os.remove(tmp)


def _stored_statistics(path: str) -> Optional[Dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z.files:
                return None
            missing = [k for k in STATS_KEYS if k not in z.files]
            if missing:
                raise ConfigError(f"reference file {path}: has 'mu' but lacks {', '.join(missing)}")
            return {k: np.asarray(z[k], np.float64) for k in STATS_KEYS}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ConfigError(f"reference file {path}: cannot read its statistics ({' '.join(str(e).split())})") from None


def reference_features(net, reference_path: str, batch_size: int = 64, progress: bool = True,
                       use_cache: bool = True) -> Dict[str, np.ndarray]:
    """{"pool", "mu", "sigma", "mu_s", "sigma_s"} of the reference, from its stored statistics and/or the cache."""
    if not os.path.isfile(reference_path):
        raise ConfigError(f"reference file not found: {reference_path}")
    key = _cache_key(reference_path, net)
    cpath = cache_path(reference_path)
    if use_cache:
        cached = _read_cache(cpath, key)
        if cached is not None:
            log.info("reference features from %s", cpath)
            return cached
    images = NpzImages(reference_path, what="reference")
    stored = _stored_statistics(reference_path)
    feats = compute_features(net, images, batch_size, progress, desc="reference")
    ref = {"pool": feats["pool"]}
    if stored is not None:
        ref.update(stored)
    else:
        ref["mu"], ref["sigma"] = adm.statistics(feats["pool"])
        ref["mu_s"], ref["sigma_s"] = adm.statistics(feats["spatial"])
    if use_cache:
        _write_cache(cpath, key, ref)
    return ref


def load_network(directory: str):
    """The converted FID Inception-v3 (convert/inception.py) in `directory`."""
    from l2c_jax.eval.inception import load_inception

    return load_inception(directory)


def evaluate(samples_path: str, reference_path: str, inception, batch_size: int = 64,
             progress: bool = True, use_cache: bool = True) -> Dict[str, float]:
    """The five numbers of the ADM evaluator: "Inception Score", "FID", "sFID", "Precision", "Recall".

    `inception` is a converted network directory or an object with the
    `features(x)` / `fc_weight` interface of `l2c_jax.eval.inception.InceptionNet`.
    """
    # Check both inputs before the (slow) network load and feature passes.
    samples = NpzImages(samples_path, what="samples")
    if not os.path.isfile(reference_path):
        raise ConfigError(f"reference file not found: {reference_path}")
    net = load_network(inception) if isinstance(inception, (str, os.PathLike)) else inception
    ref = reference_features(net, reference_path, batch_size, progress, use_cache)
    sample = compute_features(net, samples, batch_size, progress, desc="samples")
    if len(ref["pool"]) <= 3 or len(sample["pool"]) <= 3:
        raise ConfigError(f"precision / recall need at least 4 images per set; got {len(ref['pool'])} "
                          f"reference and {len(sample['pool'])} sample images")
    return adm.compute_all(ref, sample, net.fc_weight)

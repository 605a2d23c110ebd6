"""The pieces of multi-process jobs, in one process: shards, per-image draws, the data split, the flags."""

import numpy as np
import pytest

from l2c_jax.errors import ConfigError
from l2c_jax.shards import ShardError, ShardStore, batches_of

FAMILY = "dit"


def _store(tmp_path, n=10, **job):
    s = ShardStore(str(tmp_path / "shards"), dict(dict(seed=0), **job), n)
    s.prepare()
    s.check()
    return s


def _imgs(indices):
    return np.stack([np.full((3, 2, 1), i, np.uint8) for i in indices])


def test_shards_resume_and_assemble_in_index_order(tmp_path):
    s = _store(tmp_path)
    s.write([4, 5, 6], _imgs([4, 5, 6]))
    s.write([0, 1], _imgs([0, 1]))
    (tmp_path / "shards" / "shard-000000007.npz.tmp-123").write_bytes(b"half a shard of a killed process")
    np.testing.assert_array_equal(s.remaining(), [2, 3, 7, 8, 9])
    with pytest.raises(ShardError, match="5 of 10 images are missing"):
        s.assemble(str(tmp_path / "out.npz"))
    s.write([9, 2, 3], _imgs([9, 2, 3]))  # indices need not be sorted within a shard
    s.write([7, 8], _imgs([7, 8]))
    assert s.remaining().size == 0
    np.testing.assert_array_equal(s.read([8, 9, 0]), _imgs([8, 9, 0]))
    path = s.assemble(str(tmp_path / "out.npz"))
    with np.load(path) as z:
        assert list(z.keys()) == ["arr_0"]
        np.testing.assert_array_equal(z["arr_0"], _imgs(range(10)))
    s.remove()
    assert not (tmp_path / "shards").exists()


def test_an_image_in_two_shards_is_refused(tmp_path):
    s = _store(tmp_path, n=3)
    s.write([0, 1], _imgs([0, 1]))
    s.write([2, 1], _imgs([2, 1]))
    with pytest.raises(ShardError, match="image 1 is in more than one shard"):
        s.assemble(str(tmp_path / "out.npz"))


def test_unfinished_shards_of_another_job_are_refused(tmp_path):
    s = _store(tmp_path, seed=0)
    s.write([0], _imgs([0]))
    other = ShardStore(str(tmp_path / "shards"), dict(seed=1), 10)
    other.prepare()  # the record of the first job stays
    with pytest.raises(ConfigError, match="another job .*differs in seed"):
        other.check()
    (tmp_path / "shards" / "shard-000000000.npz").write_bytes(b"not a zip")
    with pytest.raises(ShardError, match="unreadable shard"):
        s.done()


def test_batches_are_dealt_round_robin():
    rest = np.array([1, 2, 3, 5, 8, 9, 10])
    assert [b.tolist() for b in batches_of(rest, 3, 0, 2)] == [[1, 2, 3], [10]]
    assert [b.tolist() for b in batches_of(rest, 3, 1, 2)] == [[5, 8, 9]]


def test_noise_labels_and_step_noise_depend_only_on_seed_and_index(model):
    import jax
    import ml_collections

    from l2c_jax.pipelines import sample_labels, sample_noise, sample_step_keys
    from l2c_jax.sampling import DiTSampler

    cfg = model.config
    shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
    np.testing.assert_array_equal(sample_noise(0, [3, 4], shape), sample_noise(0, np.arange(6), shape)[3:5])
    assert not np.allclose(sample_noise(0, [3], shape), sample_noise(1, [3], shape))
    c = ml_collections.ConfigDict(dict(seed=0, labels=(), num_samples=20))
    y20 = sample_labels(c, 1000)
    c.num_samples = 7
    np.testing.assert_array_equal(sample_labels(c, 1000), y20[:7])
    assert len(set(y20.tolist())) > 10

    # DDPM draws noise at every step: from per-image keys, an image is the same in any batch.
    sampler = DiTSampler(model, 5, solver="ddpm", cfg_scale=4.0)
    idx = np.arange(4)
    y = np.array([1, 2, 3, 4])
    whole = sampler(sample_noise(0, idx, shape), y, key=sample_step_keys(0, idx))
    part = sampler(sample_noise(0, idx[2:], shape), y[2:], key=sample_step_keys(0, idx[2:]))
    np.testing.assert_allclose(np.asarray(part), np.asarray(whole)[2:], atol=1e-5)
    with pytest.raises(ConfigError, match="one per sample"):
        sampler(sample_noise(0, idx, shape), y, key=sample_step_keys(0, idx[:3]))
    # One key for the batch still works as before.
    assert sampler(sample_noise(0, idx, shape), y, key=jax.random.key(0)).shape == whole.shape


def test_each_process_reads_its_rows_of_the_global_batch():
    from l2c_jax.training.data import ArraySource, Batches

    src = ArraySource(np.arange(40 * 4, dtype=np.uint8).reshape(40, 2, 2, 1), np.arange(40))
    one = Batches(src, 8, seed=3)
    parts = [Batches(src, 8, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    for _ in range(7):  # across an epoch boundary
        whole = next(one)
        halves = [next(b) for b in parts]
        np.testing.assert_array_equal(np.concatenate([h["y"] for h in halves]), whole["y"])
        np.testing.assert_array_equal(np.concatenate([h["images"] for h in halves]), whole["images"])
    with pytest.raises(ConfigError, match="not divisible by 3 processes"):
        Batches(src, 8, process_index=0, process_count=3)


def test_distributed_flags_are_checked(monkeypatch):
    from l2c_jax import distributed

    with pytest.raises(ConfigError, match="need all of"):
        distributed.initialize("127.0.0.1:1234", None, 0)
    with pytest.raises(ConfigError, match=r"process_id must lie in \[0, 1\]"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        distributed.initialize("localhost", 2, 0)
    assert distributed.initialize("127.0.0.1:1234", 1, 0) is False  # one process: nothing to start
    monkeypatch.setenv("SLURM_JOB_ID", "1")  # a SLURM step of one task is no cluster
    for k, v in dict(SLURM_NODELIST="n1", SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0",
                     SLURM_STEP_NODELIST="n1", SLURM_STEP_NUM_NODES="1").items():
        monkeypatch.setenv(k, v)
    assert distributed.detect_cluster() is None
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.detect_cluster() == "slurm"
    monkeypatch.setenv("L2C_DISTRIBUTED", "0")
    assert distributed.detect_cluster() is None

"""The training data path (ganpipe.batches): prefetched, synchronous and on-device batches are the
same batches in the same order, training on them gives bitwise the same weights, a checkpoint
taken while batches are prefetched resumes exactly, and a failure in the prefetching thread
reaches the training step."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ganpipe import batches as batches_module
from ganpipe import runs
from ganpipe.batches import RealBatches, choose_mode
from ganpipe.config import Config
from ganpipe.config_files import load_config
from ganpipe.data import open_prepared
from ganpipe.errors import UserError
from ganpipe.recipe import BatchSampler, network_spec
from ganpipe.trainer import Trainer
from tests.conftest import TINY_DIGITS, write_config
from tests.fixtures import assert_bitwise_equal, new_run_dir, train_iterations, trainer_weights

# 100 records and batch 32: an epoch ends every few batches, so prefetching runs across epochs.
# Relativistic loss: the generator update draws its own real batch; conditional: labels travel too.
PATH_SETTINGS = ["train.cpu=true", "data.max_records=100", "train.loss=relativistic", "model.conditional=true",
                 "train.d_steps=2", "train.r1_gamma=1"]


def config(tmp_path: Path, *extra: str) -> Config:
    return load_config(write_config(tmp_path / "c.yaml", TINY_DIGITS), [*PATH_SETTINGS, *extra])


def prefetched_ahead(trainer: Trainer) -> bool:
    """Whether the thread's sampler has drawn past what the step consumed (it gathers in the
    background, so give it a moment on a busy machine)."""
    deadline = time.monotonic() + 10
    while trainer.sampler.state_dict() == trainer.batches.state_dict() and time.monotonic() < deadline:
        time.sleep(0.01)
    return trainer.sampler.state_dict() != trainer.batches.state_dict()


def batch_streams(cfg: Config, run_dir: Path, count: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """`count` batches from each mode, all forced on the CPU (the on-device cache included)."""
    data = open_prepared(_location(run_dir))
    spec = network_spec(cfg, data)
    out = {}
    for mode in ("sync", "prefetch", "device"):
        sampler = BatchSampler(data.num_records, 32, cfg.seed, 0, 1)
        source = RealBatches(data, sampler, spec, torch.device("cpu"), torch.contiguous_format, mode, prefetch=2)
        out[mode] = [source.next() for _ in range(count)]
        source.close()
    return out


def _location(run_dir: Path) -> str:
    return runs.read_info(run_dir)["data"]["location"]


def test_every_mode_serves_the_samplers_batches_in_order(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run_dir = new_run_dir(cfg)
    streams = batch_streams(cfg, run_dir, 12)  # 12 x 32 rows: almost 4 epochs of 100
    data = open_prepared(_location(run_dir))
    sampler = BatchSampler(data.num_records, 32, cfg.seed, 0, 1)
    for i in range(12):
        raw, labels = data.gather(sampler.next_indices())
        expected = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        for mode, stream in streams.items():
            x, y = stream[i]
            assert x.dtype == torch.float32 and x.shape == (32, 1, 16, 16), mode
            assert torch.equal(x, expected), (mode, i)
            assert torch.equal(y, torch.from_numpy(labels)), (mode, i)
    assert float(streams["sync"][0][0].min()) >= -1.0 and float(streams["sync"][0][0].max()) <= 1.0


def test_prefetching_and_synchronous_training_give_identical_weights(tmp_path: Path) -> None:
    """Relativistic loss with d_steps 2: three real batches a step, the generator's among them,
    across epoch boundaries; ADA draws its parameters beside them."""
    results, positions = {}, {}
    for prefetch in (0, 2, 5):
        cfg = config(tmp_path, f"train.prefetch={prefetch}", f"train.run_name=prefetch-{prefetch}",
                     "train.augment=ada", "train.ada_kimg=1", "train.ada_interval=2")
        trainer = Trainer(cfg, new_run_dir(cfg))
        assert trainer.batches.mode == ("prefetch" if prefetch else "sync")
        train_iterations(trainer, 8)
        results[prefetch], positions[prefetch] = trainer_weights(trainer), trainer.batches.state_dict()
        if prefetch:  # the thread ran ahead of what was consumed
            assert prefetched_ahead(trainer)
        trainer.close()
        assert trainer.batches._thread is None
    assert positions[0] == positions[2] == positions[5] == {"epoch": 7, "cursor": 68}  # 24 batches of 32 from 100
    assert_bitwise_equal(results[0], results[2])
    assert_bitwise_equal(results[0], results[5])


def test_resume_with_prefetch_on_is_bitwise_exact(tmp_path: Path) -> None:
    """A checkpoint saved while the thread has batches queued holds the position after the
    batches consumed: a fresh trainer resumed from it trains as the uninterrupted one does."""
    cfg = config(tmp_path, "train.prefetch=3")
    run_dir = new_run_dir(cfg)
    straight = Trainer(cfg, run_dir)
    train_iterations(straight, 3)
    assert prefetched_ahead(straight)
    saved = straight.save({"metrics": {}})
    assert saved is not None
    state = torch.load(saved / "state.pt", weights_only=True)
    assert state["sampler"] == straight.batches.state_dict() != straight.sampler.state_dict()
    train_iterations(straight, 4)
    expected = trainer_weights(straight)
    straight.close()

    resumed = Trainer(cfg, run_dir)
    assert resumed.resumed_from == 3
    train_iterations(resumed, 4)
    assert_bitwise_equal(trainer_weights(resumed), expected)
    resumed.close()


def test_a_failure_in_the_prefetching_thread_reaches_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path, "train.prefetch=2")
    trainer = Trainer(cfg, new_run_dir(cfg))
    calls = []
    original = trainer.data.gather

    def failing(indices: np.ndarray, out: np.ndarray | None = None):
        calls.append(len(indices))
        if len(calls) == 3:
            raise OSError("shard images-00000.npy: read error")
        return original(indices, out)

    monkeypatch.setattr(trainer.data, "gather", failing)
    trainer.real_batch()
    trainer.real_batch()
    with pytest.raises(OSError, match="images-00000.npy: read error"):
        trainer.real_batch()
    assert trainer.batches._thread is None  # stopped, not left running
    assert trainer.batches.state_dict() == {"epoch": 0, "cursor": 64}  # two batches consumed


def test_loading_a_position_drops_prefetched_batches(tmp_path: Path) -> None:
    cfg = config(tmp_path, "train.prefetch=4")
    trainer = Trainer(cfg, new_run_dir(cfg))
    first, _ = trainer.real_batch()
    start = {"epoch": 0, "cursor": 0}
    trainer.batches.load_state_dict(start)
    again, _ = trainer.real_batch()
    assert torch.equal(first, again) and trainer.batches.state_dict() == {"epoch": 0, "cursor": 32}
    trainer.close()


def test_the_on_device_cache_is_chosen_on_cuda_when_the_data_fits(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Decided from the device's memory (faked here: no GPU in the test machines); too large a
    dataset falls back to prefetching with one logged line, never an error; on CPU the memory
    map is the cache."""
    cfg = config(tmp_path)
    data = open_prepared(_location(new_run_dir(cfg)))
    assert data.nbytes == 100 * 16 * 16 * 1 + 100 * 8  # uint8 pixels and int64 labels
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(batches_module.torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=4 * data.nbytes))
    assert choose_mode(data, cuda, prefetch=2, fraction=0.25) == ("device", None)
    mode, note = choose_mode(data, cuda, prefetch=2, fraction=0.2)
    assert mode == "prefetch"
    assert note is not None and note.startswith("data: the prepared data") and "train.data_on_device_fraction 0.2" in note
    assert choose_mode(data, cuda, prefetch=0, fraction=0.2)[0] == "sync"
    assert choose_mode(data, cuda, prefetch=2, fraction=0.0) == ("prefetch", None)
    assert choose_mode(data, torch.device("cpu"), prefetch=2, fraction=1.0) == ("prefetch", None)
    assert choose_mode(data, torch.device("cpu"), prefetch=0, fraction=1.0) == ("sync", None)


def test_data_path_keys_leave_the_run_identity_alone(tmp_path: Path) -> None:
    """prefetch and data_on_device_fraction change how batches travel, never which: the same
    run continues when they change."""
    base = config(tmp_path)
    assert runs.run_identity(base) == runs.run_identity(config(tmp_path, "train.prefetch=0",
                                                               "train.data_on_device_fraction=0"))
    with pytest.raises(UserError, match=r"c.yaml: key 'train.prefetch': .*greater than or equal to 0"):
        config(tmp_path, "train.prefetch=-1")

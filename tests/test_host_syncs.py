"""No host-device synchronisation inside a training step, except the two the algorithms need:
the adaptive schedule reads each update's loss, and ADA reads its sign statistics back once
every `train.ada_interval` D updates. Counted on the CPU with tests/host_syncs.py, which follows
where each tensor would live on a GPU (see its docstring)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY_DIGITS, write_config
from tests.host_syncs import HostSyncCounter

ITERATIONS = 6  # fewer than train.log_every: the loop's own syncs (logging, checks) come at log steps
GAUSSIANS = ["data.kind=vector", "data.source=builtin:gaussians25", "data.columns=[x,y]", "model.family=mlp",
             "model.conditional=false"]
CASES: dict[str, tuple[list[str], dict[tuple[str, str, str], int]]] = {
    "plain": ([], {}),
    "relativistic, R1, R2, diffaug, k=2": (["train.loss=relativistic", "train.r1_gamma=1", "train.r2_gamma=1",
                                            "train.augment=diffaug", "train.d_steps=2"], {}),
    "wgan_gp, accumulation": (["train.loss=wgan_gp", "train.grad_accum=2"], {}),
    "prefetching thread": (["train.prefetch=2"], {}),
    "vectors": (GAUSSIANS, {}),
    "ada": (["train.augment=ada", "train.ada_interval=2"],
            {("readback", "tolist", "d_augment.py:after_d_update"): ITERATIONS // 2}),
    "adaptive schedule": (["train.schedule=adaptive"],
                          {("readback", "item", "trainer.py:adaptive_update"): ITERATIONS}),
}


def count_syncs(config: Path, overrides: list[str], mixed_precision: str = "no") -> Counter:
    """Synchronising calls in ITERATIONS steps of a fresh trainer (the first steps included:
    lazily created state, such as the optimisers', counts too)."""
    from ganpipe.config_files import load_config
    from ganpipe.trainer import Trainer
    from tests.fixtures import new_run_dir

    cfg = load_config(config, ["train.cpu=true", "train.prefetch=0", "model.conditional=true",
                               f"train.mixed_precision={mixed_precision}", *overrides])
    # The optimisers as on CUDA, fused (the trainer's choice there): their step counters live on
    # the device. The CPU's default Adam keeps them on the host and reads them back each step,
    # which is no synchronisation there, but the hook cannot tell it from one.
    adam = torch.optim.Adam
    torch.optim.Adam = lambda params, **kw: adam(params, **{**kw, "fused": True})
    try:
        trainer = Trainer(cfg, new_run_dir(cfg))
    finally:
        torch.optim.Adam = adam
    if cfg.train.augment == "ada":
        trainer.augment.p = 0.5  # every ADA transform runs, whatever r_t does in a few steps
    with HostSyncCounter() as syncs:
        for _ in range(ITERATIONS):
            trainer.iteration()
            trainer.step += 1
    trainer.close()
    return syncs.events


@pytest.mark.parametrize("case", list(CASES))
def test_a_training_step_synchronises_only_where_the_algorithm_needs_a_value(tmp_path: Path, case: str) -> None:
    overrides, expected = CASES[case]
    config = write_config(tmp_path / "c.yaml", TINY_DIGITS)
    assert count_syncs(config, overrides) == Counter(expected)


BF16 = """
import json, sys
from pathlib import Path
from tests.test_host_syncs import CASES, count_syncs
out = {case: [[*key, n] for key, n in count_syncs(Path(sys.argv[1]), [*o, f"train.run_name=r{i}"], "bf16").items()]
       for i, (case, (o, _)) in enumerate(CASES.items())}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_bf16_steps_synchronise_no_more(tmp_path: Path) -> None:
    """Under Accelerate's bf16 autocast too (its own process: Accelerate's state is one per process)."""
    config = write_config(tmp_path / "c.yaml", TINY_DIGITS)
    proc = subprocess.run([sys.executable, "-c", BF16, str(config)], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, (_, expected) in CASES.items():
        assert Counter({tuple(row[:3]): row[3] for row in found[case]}) == Counter(expected), case


def test_the_counter_sees_what_would_synchronise_on_a_gpu() -> None:
    """The hook can fail: readbacks of device tensors, boolean masks on them and blocking copies
    to the device are counted; host-side work and non-blocking copies are not."""
    weights = torch.ones(4)  # made before the hook: a device tensor, like the networks' weights
    site = "test_host_syncs.py:test_the_counter_sees_what_would_synchronise_on_a_gpu"
    with HostSyncCounter() as syncs:
        drawn = torch.rand(4, generator=torch.Generator().manual_seed(0))  # a CPU generator's draw: host
        assert bool(drawn.any()) and len(drawn.tolist()) == 4  # decisions on the host: free
        moved = drawn.to(weights.device, non_blocking=True)
        (weights * moved).sum().item()
        bool((weights > 0).any())
        drawn.to(weights.device)
        torch.tensor(1.0, device=weights.device)
        torch.full((), 1.0, device=weights.device)  # a fill on the device: free
        weights[weights > 0]
        torch.where(weights > 0, 3, weights)  # a Python scalar: free
        (weights + 1).cpu()
    assert syncs.events == Counter({("readback", "item", site): 1, ("readback", "__bool__", site): 1,
                                    ("blocking copy", "to", site): 1,
                                    ("blocking copy", "torch.tensor(device=)", site): 1,
                                    ("readback", "__getitem__[bool mask]", site): 1, ("readback", "cpu", site): 1})

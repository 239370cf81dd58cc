"""--device auto|cpu|cuda on the torch steps: auto is the CPU here and changes no figure, cuda without a GPU is a
clear error before any work, and the CUDA path (bf16 autocast, deterministic kernels) has its own tests, which
run where torch sees a GPU and are skipped here with the reason."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.circuits import circuits_for
from pipeline.model import device_facts, make_windows, position_stats, resolve_device
from pipeline.settings import DEVICES
from pipeline.unlearn import run_unlearning
from tests.conftest import REPO, with_unlearn
from tests.test_unlearn import forget_users

NO_CUDA = "no CUDA device on this machine (CPU-only torch build, no GPU): the CUDA path runs where torch sees one"
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


def test_auto_is_the_cpu_without_a_gpu_and_an_unknown_device_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto is CUDA here")
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"unknown device 'tpu'; choose one of \['auto', 'cpu', 'cuda'\]"):
        resolve_device("tpu")
    assert DEVICES == ("auto", "cpu", "cuda")


@pytest.mark.parametrize("step", ["train", "extract_circuits", "unlearn", "evaluate"])
def test_a_torch_step_asked_for_cuda_without_one_fails_before_any_work(step, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    arguments = [] if step == "train" else ["--batch-dir", str(tmp_path / "batch")]
    result = subprocess.run(
        [sys.executable, "-m", f"components.{step}", "--home", str(tmp_path / "home"), *arguments, "--device", "cuda"],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"lethe {step}: error: --device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)"
    )
    assert not (tmp_path / "home").exists() and not (tmp_path / "batch").exists()


def test_a_model_on_the_cpu_says_so(trained):
    assert device_facts(trained[0]) == {"device": "cpu", "precision": "fp32"}


@cuda
@needs_cuda
def test_unlearning_on_cuda_is_deterministic_and_close_to_the_cpu(trained, snapshot, settings):
    """bf16 autocast changes the rounding, not the result: the forgotten users' AUCs after the same steps stay
    within 0.05 of the CPU's, and the same seed gives the same weights twice on the GPU."""
    data, short = forget_users(snapshot), with_unlearn(settings, max_steps=6)
    on_cpu = run_unlearning(copy.deepcopy(trained[0]), data, short, progress=False)
    first, second = (copy.deepcopy(trained[0]).to("cuda") for _ in range(2))
    assert device_facts(first)["precision"] == "bf16-autocast"
    on_gpu = run_unlearning(first, data, short, progress=False)
    run_unlearning(second, data, short, progress=False)
    for attack, auc in on_cpu.aucs.items():
        assert abs(on_gpu.aucs[attack] - auc) < 0.05, (attack, on_gpu.aucs, on_cpu.aucs)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@cuda
@needs_cuda
def test_circuits_and_attack_statistics_on_cuda_match_the_cpu(trained, snapshot, settings):
    data = forget_users(snapshot)
    forget = make_windows(data.forget_sequences, settings.model.max_len, data.forget_scored)
    retain = make_windows(data.retain_sequences, settings.model.max_len)
    on_cpu = circuits_for(trained[0], forget, retain, settings.circuits, settings.seed)
    gpu_model = copy.deepcopy(trained[0]).to("cuda")
    on_gpu = circuits_for(gpu_model, forget, retain, settings.circuits, settings.seed)
    for group, sites in on_cpu.groups.items():  # the partition overlaps the CPU's by most of its units
        ours = sum(int((sites[s] & on_gpu.groups[group][s]).sum()) for s in sites)
        assert ours >= 0.8 * sum(int(sites[s].sum()) for s in sites), group
    cpu_stats = position_stats(trained[0], forget, settings.eval.attack_batch_size)
    gpu_stats = position_stats(gpu_model, forget, settings.eval.attack_batch_size)
    assert np.array_equal(cpu_stats.users, gpu_stats.users)
    assert np.allclose(cpu_stats.log_prob, gpu_stats.log_prob, atol=0.1)

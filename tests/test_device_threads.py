"""CPU thread policy (core/device.py ``apply_thread_policy``) and the OpenMP waiting policy set at
package import (``napari_histo_wsss.OPENMP_WAIT_ENV``): a GUI keeps a core, explicit user
settings win, torch's threads wait passively (bench/bench_threads.py measures why)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import napari_histo_wsss
from napari_histo_wsss.core import device as dev
from napari_histo_wsss.core.device import DeviceError, apply_thread_policy, available_cores, thread_count

WAIT_VARS = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")


@pytest.fixture
def machine(monkeypatch):
    """A fake machine: ``machine(cores, torch_default)`` -> affinity mask of ``cores`` CPUs, torch
    starting with ``torch_default`` threads, no thread variables in the environment. torch's real
    thread count is restored afterwards."""
    before = torch.get_num_threads()

    def make(cores: int, torch_default: int | None = None) -> None:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HISTO_WSSS_THREAD_POLICY", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        default = torch_default or cores
        torch.set_num_threads(default)
        monkeypatch.setattr(dev, "_STARTUP_THREADS", default)
        monkeypatch.setattr(dev, "_seen_threads", default)
        monkeypatch.setattr(dev, "_gui_mode", False)
        monkeypatch.setattr(dev, "_caller_owns_threads", False)

    yield make
    torch.set_num_threads(before)


def test_gui_leaves_a_core_headless_uses_all(machine):
    machine(2)
    assert apply_thread_policy(gui=True) == 1
    assert torch.get_num_threads() == 1
    assert apply_thread_policy(gui=False) == 2
    assert torch.get_num_threads() == 2
    machine(1)
    assert apply_thread_policy(gui=True) == 1  # never zero


def test_engines_keep_the_mode_of_the_entry_point(machine):
    machine(4)
    apply_thread_policy(gui=True)
    assert apply_thread_policy() == 3  # what train_classifier/train_segmenter call
    apply_thread_policy(gui=False)
    assert apply_thread_policy() == 4


def test_cores_are_the_affinity_mask_not_the_machine(machine, monkeypatch):
    machine(4, torch_default=16)  # e.g. a container or `taskset` with 4 of 16 CPUs
    assert apply_thread_policy(gui=False) == 4 and torch.get_num_threads() == 4
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS / Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert available_cores() == 6


def test_torchrun_ranks_share_the_cores(machine, monkeypatch):
    machine(8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert thread_count(gui=False) == 4


def test_explicit_user_settings_win(machine, monkeypatch):
    machine(4)
    assert apply_thread_policy(gui=True, threads=4) == 4  # --torch-threads
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert apply_thread_policy(gui=False) == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert apply_thread_policy(gui=True) == 4
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(2)  # the caller's own code (a script, a test fixture)
    assert apply_thread_policy(gui=False) == 2 and torch.get_num_threads() == 2
    # ...and it stays the caller's for the next run in the same process: switching a second run
    # to the policy's count would change float reductions between two runs of one script.
    torch.set_num_threads(1)
    assert apply_thread_policy(gui=False) == 1
    assert apply_thread_policy(gui=False) == 1 and torch.get_num_threads() == 1
    assert apply_thread_policy(threads=3) == 3  # --torch-threads still wins
    with pytest.raises(DeviceError, match="at least 1"):
        apply_thread_policy(threads=0)


def test_policy_off_leaves_torch_alone(machine, monkeypatch):
    machine(4)
    monkeypatch.setenv("HISTO_WSSS_THREAD_POLICY", "off")
    assert apply_thread_policy(gui=True) == 4 and torch.get_num_threads() == 4


def test_gui_background_jobs_run_under_the_gui_policy(machine):
    """The dock widgets' jobs (training, CAMs, prediction) start in a worker thread that applies
    the GUI policy before the core generator runs: on 2 cores the job computes with 1 thread."""
    pytest.importorskip("napari")
    from napari_histo_wsss.widgets._worker import _drive

    machine(2)
    seen: list[int] = []

    def job(should_stop):
        yield torch.get_num_threads()

    def worker():
        seen.extend(_drive(job, threading.Event(), threading.Event()))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [1]


def test_training_engine_applies_the_policy_in_its_thread(machine, tmp_path):
    """train_classifier applies the policy of the process's mode when it starts: a GUI process on
    2 cores trains with 1 thread, even if the worker thread's count was still torch's default."""
    from test_train import make_dataset, tiny

    from napari_histo_wsss.core.stage1.train import train_classifier

    data = make_dataset(tmp_path / "ds", n_train=8, size=32, n_val=0)
    machine(2)
    dev._gui_mode = True  # as set by a GUI entry point (restored by the fixture's monkeypatch)
    seen = []
    for _ev in train_classifier(data, tmp_path / "run", tiny(epochs=1, max_steps_per_epoch=1, val_fraction=0.25)):
        seen.append(torch.get_num_threads())
    assert seen and set(seen) == {1}


def test_wait_env_defaults_do_not_override_the_user():
    env: dict[str, str] = {}
    assert napari_histo_wsss._set_openmp_wait_env(env) == napari_histo_wsss.OPENMP_WAIT_ENV
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0", "GOMP_SPINCOUNT": "0"}
    # Any explicit choice is the user's policy: GOMP_SPINCOUNT=0 would undo OMP_WAIT_POLICY=ACTIVE.
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert napari_histo_wsss._set_openmp_wait_env(env) == {} and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {"KMP_BLOCKTIME": "200"}
    napari_histo_wsss._set_openmp_wait_env(env)
    assert env == {"KMP_BLOCKTIME": "200"}
    env = {"HISTO_WSSS_THREAD_POLICY": "off"}
    assert napari_histo_wsss._set_openmp_wait_env(env) == {}


def test_package_import_sets_wait_env_before_torch_loads():
    """In a fresh interpreter: importing the package sets the variables without importing torch
    (the OpenMP runtime reads them when torch loads it), and the engine policy then gives one
    inter-op thread."""
    code = (
        "import json, os, sys\n"
        "import napari_histo_wsss\n"
        "torch_loaded = 'torch' in sys.modules\n"
        "from napari_histo_wsss.core.device import apply_thread_policy\n"
        "import torch\n"
        "apply_thread_policy()\n"
        f"print(json.dumps([torch_loaded, torch.get_num_interop_threads(), {{k: os.environ.get(k) for k in {WAIT_VARS!r}}}]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARS and k != "HISTO_WSSS_THREAD_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    torch_loaded, interop, wait = json.loads(out.strip().splitlines()[-1])
    assert not torch_loaded
    assert interop == 1
    assert wait == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0", "GOMP_SPINCOUNT": "0"}
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1])[2] == {"OMP_WAIT_POLICY": "ACTIVE", "KMP_BLOCKTIME": None, "GOMP_SPINCOUNT": None}

import sys

import numpy as np
import pytest

from npllama import backend, train
from npllama.errors import UserError
from npllama.runtime import cpu, parallel


def test_cpu(restore_backend):
    assert backend.use("cpu") == "cpu"
    assert backend.xp() is np and backend.device() == "cpu"
    assert backend.describe().startswith("cpu (NumPy")


def test_unknown_device(restore_backend):
    with pytest.raises(backend.BackendError, match="unknown device 'tpu'"):
        backend.use("tpu")


def test_cuda_without_cupy_is_one_clear_line(restore_backend, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail as if not installed
    with pytest.raises(backend.BackendError) as error:
        backend.use("cuda")
    assert str(error.value) == ("--device cuda was asked for, but CuPy is not installed "
                                "(pip install cupy-cuda12x, matching your CUDA)")
    monkeypatch.delenv("NPLLAMA_DEVICE")
    assert backend.use("auto") == "cpu" and backend.xp() is np


def test_environment_variable_chooses(restore_backend, monkeypatch):
    monkeypatch.setenv("NPLLAMA_DEVICE", "CPU")
    backend._active = None
    assert backend.device() == "cpu"
    assert backend.use("auto") == "cpu"  # what --device auto (the commands' default) leaves to it


def test_an_unknown_device_in_the_environment_is_one_clear_line(restore_backend, monkeypatch):
    monkeypatch.setenv("NPLLAMA_DEVICE", "tpu")
    with pytest.raises(backend.BackendError, match="NPLLAMA_DEVICE='tpu' is not a device; set it to one of cpu, cuda, auto"):
        backend.use("auto")
    assert backend.use("cpu") == "cpu"  # an explicit choice does not ask the environment


def test_array_module_and_moves(xp):
    host = np.arange(6, dtype=np.float32)
    assert backend.array_module(host, [1, 2]) is np
    on_device = backend.to_device(host, dtype="float64")
    assert backend.to_host(on_device).dtype == np.float64
    np.testing.assert_array_equal(backend.to_host(on_device), host)


def test_scatter_add_accumulates_repeats(xp):
    target = xp.zeros((4, 2))
    backend.scatter_add(target, xp.asarray([1, 3, 1]), xp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    np.testing.assert_array_equal(backend.to_host(target), [[0, 0], [6, 8], [0, 0], [3, 4]])


def test_usable_cores_follow_a_container_quota(tmp_path):
    unlimited = cpu.usable_cores(cpu_max=str(tmp_path / "absent"))
    assert unlimited >= 1
    limits = tmp_path / "cpu.max"
    limits.write_text("max 100000\n")
    assert cpu.usable_cores(cpu_max=str(limits)) == unlimited
    limits.write_text("150000 100000\n")  # 1.5 CPUs: one whole core
    assert cpu.usable_cores(cpu_max=str(limits)) == 1


def test_workers_setting_is_checked(restore_backend, monkeypatch):
    backend.use("cpu")
    monkeypatch.setenv("NPLLAMA_WORKERS", "two")
    with pytest.raises(UserError, match="NPLLAMA_WORKERS must be a positive integer, got 'two'"):
        parallel.default_count()
    monkeypatch.setenv("NPLLAMA_WORKERS", "3")
    assert parallel.default_count() == 3 and train.TrainSettings().workers == 3  # the default a run records
    with pytest.raises(train.TrainError, match="workers must be at least 1, got 0"):
        train.TrainSettings(workers=0)

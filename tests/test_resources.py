"""cw.resources in-process: parsing --resources and --gpus, fits, a worker's Capacity. The
environment and ``nvidia-smi -L`` come in as arguments, so no GPU is needed."""
from __future__ import annotations

import pytest

from cw import resources as R
from cw.errors import NoGpus, ResourceError

SMI = """GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5f3c2a1b-0000-1111-2222-333344445555)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-6a7b8c9d-0000-1111-2222-333344445555)
"""


def test_parse_resources():
    assert R.parse_resources("gpu=1,mem=64") == {"gpu": 1.0, "mem": 64.0}
    assert R.parse_resources(" mem = 0.5 , licence=2 ") == {"mem": 0.5, "licence": 2.0}
    assert R.parse_resources("") == {}
    for bad in ("gpu", "gpu=x", "gpu=-1", "gpu=inf", "gpu=1,gpu=2", "9x=1", "a b=1"):
        with pytest.raises(ResourceError):
            R.parse_resources(bad)


def test_check_need():
    assert R.check_need(None) is None and R.check_need({}) is None
    assert R.check_need({"gpu": 1, "mem": 0}) == {"gpu": 1.0}
    for bad in ([1], {"gpu": "1"}, {"gpu": True}, {"gpu": -1}, {1: 1}):
        with pytest.raises(ResourceError):
            R.check_need(bad)


def test_fits_take_give():
    free = {"gpu": 1.0, "mem": 64.0}
    assert R.fits(None, free) and R.fits({"mem": 64}, free)
    assert not R.fits({"gpu": 2}, free) and not R.fits({"disk": 1}, free)
    R.take(free, {"mem": 0.1})
    R.take(free, {"mem": 0.2})
    assert R.fits({"mem": 63.7}, free)      # float sums still fit exactly
    R.give(free, {"mem": 0.3})
    assert free["mem"] == pytest.approx(64)
    assert R.need_key({"b": 1, "a": 2}) == R.need_key({"a": 2, "b": 1})
    assert R.describe({"mem": 64.0, "gpu": 1.0}) == "gpu=1,mem=64"


def test_capacity_one_at_a_time_and_concurrent():
    one = R.Capacity({"gpu": 1})
    one.take({"gpu": 1})
    assert one.fits({"gpu": 1})            # runs after the held one, with all of it
    assert not one.fits({"gpu": 2}) and not R.Capacity({}).fits({"gpu": 1})
    many = R.Capacity({"mem": 64}, concurrency=4)
    many.take({"mem": 48})
    assert not many.fits({"mem": 32}) and many.fits({"mem": 16}) and many.fits(None)
    many.give({"mem": 48})
    assert many.used == {} and many.free() == {"mem": 64}
    with pytest.raises(ResourceError):
        R.Capacity({}, concurrency=0)


def test_gpus_explicit_list_is_trusted():
    assert R.parse_gpus("0,1", environ={}, smi=lambda: None) == ["0", "1"]
    assert R.parse_gpus("3", environ={"CUDA_VISIBLE_DEVICES": "0"}) == ["3"]
    for bad in ("", ",", "0,0"):
        with pytest.raises(ResourceError):
            R.parse_gpus(bad)


def test_gpus_auto():
    # a batch system's allocation wins: never widen it to what nvidia-smi sees
    assert R.parse_gpus("auto", {"CUDA_VISIBLE_DEVICES": "2,3"}, lambda: SMI) == ["2", "3"]
    assert R.parse_gpus("auto", {}, lambda: SMI) == [
        "GPU-5f3c2a1b-0000-1111-2222-333344445555", "GPU-6a7b8c9d-0000-1111-2222-333344445555"]
    assert R.gpus_listed("GPU 0: Tesla K80\n") == ["0"]
    with pytest.raises(NoGpus, match="nvidia-smi"):
        R.parse_gpus("auto", {}, lambda: None)
    with pytest.raises(NoGpus, match="lists no GPU"):
        R.parse_gpus("auto", {}, lambda: "No devices were found\n")
    with pytest.raises(NoGpus, match="no GPU visible"):
        R.parse_gpus("auto", {"CUDA_VISIBLE_DEVICES": "-1"}, lambda: SMI)


def test_gpu_processes():
    specs = R.gpu_processes(["0", "1"], {"mem": 64})
    assert [s.env for s in specs] == [{"CUDA_VISIBLE_DEVICES": "0"},
                                      {"CUDA_VISIBLE_DEVICES": "1"}]
    assert all(s.resources == {"mem": 64, "gpu": 1} for s in specs)
    assert R.gpu_processes([], {"mem": 8}) == [R.ProcessSpec({}, {"mem": 8})]
    with pytest.raises(ResourceError, match="not both"):
        R.gpu_processes(["0"], {"gpu": 2})

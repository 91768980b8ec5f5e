"""Dispatch rules of backend.py and the guarantee that importing the package needs no GPU, no
triton and no compiled extension."""

import subprocess
import sys
import textwrap

import pytest
import torch

from lowrank_kernels import backend

BLOCKER = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def __init__(self, names): self.names = names
        def find_spec(self, name, path=None, target=None):
            if name in self.names or name.split('.')[0] in self.names:
                raise ImportError(f'blocked for the test: {name}')
            return None
    sys.meta_path.insert(0, Block(set(sys.argv[1].split(','))))
    """
)


def _run(blocked: str, body: str) -> subprocess.CompletedProcess:
    code = BLOCKER + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code, blocked], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})


def test_import_without_triton_and_without_extension():
    res = _run(
        "triton,lowrank_kernels._C",
        """
        import torch, lowrank_kernels as lk
        from lowrank_kernels import ops, backend, _ext
        assert 'triton' not in sys.modules, 'importing the package imported triton'
        assert not lk.HAS_EXT and 'blocked for the test' in _ext.LOAD_ERROR, _ext.LOAD_ERROR
        assert not backend.triton_available()
        out = ops.pad_slices([torch.ones(2, 2)], [(1, 3)], 4)   # falls back to the PyTorch reference
        assert out[1:3].eq(1).all() and out[0].eq(0).all() and out[3].eq(0).all()
        try:
            _ext.require_ext()
        except RuntimeError as e:
            assert 'not available' in str(e)
        else:
            raise AssertionError('require_ext did not raise')
        print('ok')
        """,
    )
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


def test_import_does_not_import_triton_even_when_installed():
    res = _run("nothing", "import lowrank_kernels, lowrank_kernels.ops, lowrank_kernels.nn\n"
                          "assert 'triton' not in sys.modules, sorted(m for m in sys.modules if 'triton' in m)[:5]\n")
    assert res.returncode == 0, res.stderr


def test_choose_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("LOWRANK_KERNELS_BACKEND", raising=False)
    assert backend.requested_backend() == "auto"
    assert backend.choose(torch.ones(1)) == "torch"


def test_choose_torch_forced(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", "torch")
    assert backend.choose(torch.ones(1)) == "torch"
    assert not backend.use_extension(torch.ones(1))


def test_choose_triton_on_cpu_needs_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.choose(torch.ones(1)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.choose(torch.ones(1), op="lowrank_matmul")


def test_bad_backend_value(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="cudnn"):
        backend.requested_backend()


def test_describe_reports_extension():
    info = backend.describe()
    assert set(info) >= {"requested", "triton", "ext", "cuda_ext", "ext_error", "cuda", "table_entries"}
    assert info["table_entries"] == len(backend.TABLE)
    assert info["ext"] is True, info["ext_error"]


@pytest.mark.parametrize("table, match", [
    ({"lora_matmul/cuda/bfloat16": "triton"}, "is not 'op/device/dtype/shape class'"),
    ({"spectral_norm/cuda/bfloat16/large-r16": "triton"}, "is not 'op/device/dtype/shape class'"),
    ({"lora_matmul/cuda/bfloat16/large-r16": "torch"}, "is not 'composed' or 'triton'"),
])
def test_table_entries_are_checked(table, match):
    with pytest.raises(ValueError, match=match):
        backend._check_table(table)
    backend._check_table({"lora_matmul/cuda/bfloat16/large-r16": "triton"})


@pytest.mark.parametrize("args, cls", [((8192, 4096, 4096, 16), "large-r16"), ((8192, 4096, 4096, 17), "large-r32"),
                                       ((64, 96, 96, 1), "small-r16"), ((64, 96, 96, 256), "small-r256"),
                                       ((64, 96, 96, 257), "small-rgt256")])
def test_shape_class(args, cls):
    assert backend.shape_class(*args) == cls


def test_pick_forced_triton(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.ones(2, 2)
    assert backend.pick("lora_matmul", x, None) == "triton"
    assert backend.pick("lora_matmul", x.double()) == "composed"  # the kernel has no fp64
    assert backend.pick("lora_matmul", x.bfloat16()) == "torch"  # the interpreter's bf16 dot is wrong
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.pick("lowrank_matmul", x)
    assert backend.pick("lowrank_matmul", x.bfloat16()) == "torch"  # decided before the interpreter check


@pytest.mark.gpu
def test_pick_auto_on_cuda_follows_table(monkeypatch):
    monkeypatch.delenv("LOWRANK_KERNELS_BACKEND", raising=False)
    x = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(backend, "TABLE", {"lora_matmul/cuda/bfloat16/small-r16": "triton"})
    assert backend.pick("lora_matmul", x, shape="small-r16") == "triton"
    assert backend.pick("lora_matmul", x, shape="large-r16") == "composed"
    assert backend.pick("lowrank_matmul", x, shape="small-r16") == "composed"


@pytest.mark.gpu
def test_choose_auto_on_cuda_is_triton(monkeypatch):
    monkeypatch.delenv("LOWRANK_KERNELS_BACKEND", raising=False)
    assert backend.choose(torch.ones(1, device="cuda")) == "triton"

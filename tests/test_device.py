"""Where the model runs and in which precision: `--precision auto` follows the hardware."""

import pytest
import torch

from btsearch.errors import BtsearchError
from btsearch.model import device


@pytest.mark.parametrize(
    "flags, native",
    [
        ("flags\t\t: fpu vme avx2 avx512f avx512_bf16 avx512_vnni", True),
        ("flags\t\t: fpu amx_tile amx_bf16 amx_int8", True),
        ("Features\t: fp asimd bf16 i8mm", True),  # Arm
        ("flags\t\t: fpu vme avx2 avx512f avx512_vnni", False),
    ],
)
def test_native_bf16_is_read_from_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\n{flags}\n\n")
    assert device.cpu_has_native_bf16(str(cpuinfo)) is native
    assert device.cpu_has_native_bf16(str(tmp_path / "missing")) is False


def test_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert device.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert device.resolve_dtype("auto", cpu) == torch.float32
    assert device.resolve_dtype("fp32", cpu) == torch.float32  # explicit choices are kept
    assert device.resolve_dtype("fp16", cpu) == torch.float16
    with pytest.raises(BtsearchError, match="unknown precision"):
        device.resolve_dtype("int8", cpu)


def test_auto_on_gpus_prefers_bf16_then_fp16(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device.default_dtype(cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert device.default_dtype(cuda) == torch.float16

"""bf16 on CPUs without bf16 units: convolutions and many-row products computed in float32, rounded once.

The reference for "what bf16 gives" is PyTorch's own bf16 kernel on the same CPU: the emulated
result must agree with it to bf16 rounding, and be exactly the float32 result rounded to bf16.
Where the CPU has bf16 units (or the tensors are float32) nothing changes.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unimedvl import precision
from unimedvl.model.autoencoder import Autoencoder
from unimedvl.model.layers import BF16_EMULATION_ROWS, Conv2d, linear

BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits: one rounding is at most half of this, relative


@pytest.fixture
def without_bf16_units(monkeypatch):
    monkeypatch.setattr(precision, "CPU_HAS_BF16_UNITS", False)


@pytest.fixture
def with_bf16_units(monkeypatch):
    monkeypatch.setattr(precision, "CPU_HAS_BF16_UNITS", True)


def _conv(stride=1, padding=1):
    torch.manual_seed(0)
    conv = Conv2d(16, 24, 3, stride=stride, padding=padding)
    return conv.to(torch.bfloat16), torch.randn(2, 16, 12, 10).to(torch.bfloat16)


def _kernel_dtypes(monkeypatch, owner, name: str, call) -> list[torch.dtype]:
    """The dtypes of the first argument that ``owner.name`` (a torch kernel) receives during ``call()``:
    which kernel ran, since the emulated and the native result may well be equal bit for bit."""
    seen, kernel = [], getattr(owner, name)

    def spy(x, *args, **kwargs):
        seen.append(x.dtype)
        return kernel(x, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(owner, name, spy)
        call()
    return seen


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_emulated_convolution_is_the_float32_result_rounded_once(without_bf16_units, monkeypatch, stride, padding):
    conv, x = _conv(stride, padding)
    assert _kernel_dtypes(monkeypatch, F, "conv2d", lambda: conv(x)) == [torch.float32]
    y = conv(x)
    assert y.dtype == torch.bfloat16
    expected = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), stride=stride, padding=padding).to(torch.bfloat16)
    assert torch.equal(y, expected)
    # PyTorch's own bf16 convolution on this CPU rounds once too (float32 accumulation): the two
    # differ by at most a rounding step of the output's magnitude
    native = nn.Conv2d.forward(conv, x).float()
    assert ((y.float() - native).abs() <= BF16_EPS * native.abs() + 1e-6).all()


def test_convolution_is_untouched_with_bf16_units_or_in_float32(with_bf16_units, monkeypatch):
    conv, x = _conv()
    assert _kernel_dtypes(monkeypatch, F, "conv2d", lambda: conv(x)) == [torch.bfloat16]
    assert torch.equal(conv(x), nn.Conv2d.forward(conv, x))
    monkeypatch.setattr(precision, "CPU_HAS_BF16_UNITS", False)
    conv32, x32 = conv.float(), x.float()
    assert _kernel_dtypes(monkeypatch, F, "conv2d", lambda: conv32(x32)) == [torch.float32]
    assert torch.equal(conv32(x32), F.conv2d(x32, conv32.weight, conv32.bias, padding=1))


def test_autoencoder_convolutions_are_the_emulating_kind():
    from unimedvl.config import AutoencoderConfig

    ae = Autoencoder(AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4))
    convs = [m for m in ae.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is Conv2d for m in convs)


@pytest.mark.parametrize("rows", [BF16_EMULATION_ROWS + 1, 200])
def test_many_row_bf16_products_are_the_float32_result_rounded_once(without_bf16_units, monkeypatch, rows):
    torch.manual_seed(1)
    w = torch.randn(48, 40).to(torch.bfloat16)
    b = torch.randn(48).to(torch.bfloat16)
    x = torch.randn(rows, 40).to(torch.bfloat16).requires_grad_()
    with torch.no_grad():
        assert _kernel_dtypes(monkeypatch, F, "linear", lambda: linear(x, w, b)) == [torch.float32]
    y = linear(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 48)
    assert torch.equal(y, F.linear(x.float(), w.float(), b.float()).to(torch.bfloat16))
    native = F.linear(x, w, b).float()
    assert ((y.float() - native).abs() <= BF16_EPS * native.abs() + 1e-6).all()
    y.float().sum().backward()  # differentiable, gradient back in bf16
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), w.float().sum(0).expand(rows, -1), rtol=BF16_EPS, atol=0)


def test_few_row_bf16_products_keep_the_bf16_kernel(without_bf16_units, monkeypatch):
    torch.manual_seed(2)
    w = torch.randn(48, 40).to(torch.bfloat16)
    x = torch.randn(BF16_EMULATION_ROWS, 40).to(torch.bfloat16)
    assert _kernel_dtypes(monkeypatch, F, "linear", lambda: linear(x, w)) == [torch.bfloat16]
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_many_row_products_untouched_with_bf16_units(with_bf16_units, monkeypatch):
    torch.manual_seed(3)
    w = torch.randn(48, 40).to(torch.bfloat16)
    x = torch.randn(BF16_EMULATION_ROWS + 10, 40).to(torch.bfloat16)
    assert _kernel_dtypes(monkeypatch, F, "linear", lambda: linear(x, w)) == [torch.bfloat16]
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_int8_row_blocks_in_bf16_compute_in_float32_and_round_before_the_scale(without_bf16_units, monkeypatch):
    from unimedvl.model import quantized as Q

    torch.manual_seed(4)
    layer = Q.Int8Linear.from_linear(nn.Linear(40, 48, bias=False).to(torch.bfloat16))
    monkeypatch.setattr(Q, "CONVERT_ROWS", 64)  # one block: the same product as the reference below
    x = torch.randn(BF16_EMULATION_ROWS + 6, 40).to(torch.bfloat16)
    assert _kernel_dtypes(monkeypatch, torch, "mm", lambda: layer(x)) == [torch.float32]
    y = layer(x)
    expected = (x.float() @ layer.weight.float().t()).to(torch.bfloat16) * layer.scale.to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    native = (x @ layer.weight.to(torch.bfloat16).t()) * layer.scale.to(torch.bfloat16)  # torch's bf16 GEMM
    assert ((y.float() - native.float()).abs() <= 2 * BF16_EPS * native.float().abs() + 1e-6).all()

"""Fast checks of the model zoo: shapes, parameter counts against published values, init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from localsgd.config.schema import ModelConfig, ModelName
from localsgd.models import IMAGE_MODELS, build_model, resnet_cifar, simplecnn

torch.set_num_threads(2)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _resnet_option_a_params(depth: int, num_classes: int) -> int:
    """Parameter count of a CIFAR ResNet with parameter-free shortcuts, from first principles."""
    n = (depth - 2) // 6

    def conv(cin: int, cout: int) -> int:  # 3x3, no bias
        return 9 * cin * cout

    def bn(c: int) -> int:  # affine weight and bias
        return 2 * c

    total = conv(3, 16) + bn(16)
    in_ch = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv(in_ch, width) + bn(width) + conv(width, width) + bn(width)
            in_ch = width
    return total + 64 * num_classes + num_classes


# WRN-28-10 is left out: a forward pass on it is slow on CPU and it is covered below.
_FORWARD_MODELS = [m for m in IMAGE_MODELS if m is not ModelName.wrn28_10]


@pytest.mark.parametrize("name", _FORWARD_MODELS, ids=lambda m: m.value)
def test_forward_shape(name: ModelName) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_language_models_are_left_to_the_lm_task() -> None:
    with pytest.raises(ValueError, match="task.name=lm"):
        build_model(ModelConfig(name=ModelName.gpt_tiny), num_classes=7)


def test_wrn28_10_params_and_forward() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=ModelName.wrn28_10), num_classes=10).eval()
    # Published: 36.5M parameters for CIFAR-10.
    assert _num_params(model) == pytest.approx(36.5e6, rel=0.01)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10)


@pytest.mark.parametrize(
    ("depth", "published"),
    [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6), (110, 1.7e6)],
)
def test_resnet_param_counts(depth: int, published: float) -> None:
    model = resnet_cifar(depth, num_classes=10)
    count = _num_params(model)
    assert count == _resnet_option_a_params(depth, 10)
    assert count == pytest.approx(published, rel=0.02)


def test_densenet40_12_params() -> None:
    model = build_model(ModelConfig(name=ModelName.densenet40_12), num_classes=10)
    # Published: 1.0M parameters for DenseNet (L=40, k=12).
    assert _num_params(model) == pytest.approx(1.0e6, rel=0.05)


def test_vgg16_params() -> None:
    model = build_model(ModelConfig(name=ModelName.vgg16), num_classes=10)
    # 13 BN convs (14.71M) plus a 512 -> 10 classifier.
    assert _num_params(model) == pytest.approx(14.72e6, rel=0.01)


@pytest.mark.parametrize("depth", [0, 2, 19, 21, 22, 100])
def test_resnet_depth_validation(depth: int) -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet_cifar(depth, num_classes=10)


def test_resnet20_backward_gives_all_grads() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=ModelName.resnet20), num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 3])
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # The final layer's weight must actually receive a signal.
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0


def test_simplecnn_has_no_batchnorm_or_dropout() -> None:
    model = simplecnn(num_classes=10)
    for m in model.modules():
        assert not isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)), m
    assert len(list(model.buffers())) == 0


@pytest.mark.parametrize("size", [1, 5, 8, 16, 32, 40, 64])
def test_simplecnn_any_image_size(size: int) -> None:
    model = build_model(ModelConfig(name=ModelName.simplecnn), num_classes=4, image_size=size)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 4)


def test_simplecnn_is_batch_independent() -> None:
    # The property exactness tests rely on: a sample's output ignores the rest of the batch.
    torch.manual_seed(0)
    model = simplecnn(num_classes=10).train()
    x = torch.randn(4, 3, 32, 32)
    full = model(x)
    halves = torch.cat([model(x[:2]), model(x[2:])])
    torch.testing.assert_close(full, halves)


def test_seeded_init_is_reproducible() -> None:
    torch.manual_seed(123)
    a = build_model(ModelConfig(name=ModelName.resnet20), num_classes=10)
    torch.manual_seed(123)
    b = build_model(ModelConfig(name=ModelName.resnet20), num_classes=10)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na


def test_build_model_accepts_string_name() -> None:
    cfg = ModelConfig(name="resnet20")  # type: ignore[arg-type]
    assert _num_params(build_model(cfg, num_classes=10)) == _resnet_option_a_params(20, 10)


def test_build_model_validates_arguments() -> None:
    with pytest.raises(ValueError):
        build_model(ModelConfig(name=ModelName.resnet20), num_classes=0)
    with pytest.raises(ValueError, match="at least 32"):
        build_model(ModelConfig(name=ModelName.vgg16), num_classes=10, image_size=16)
    with pytest.raises(ValueError):
        build_model(ModelConfig(name="resnet18"), num_classes=10)  # type: ignore[arg-type]

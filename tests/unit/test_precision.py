"""Mixed precision and activation recomputation (one process)."""
import copy

import pytest
import torch

from hvd_trainer.config import ConfigError, load_config
from hvd_trainer.models import MLP, ResNet
from hvd_trainer.precision import Precision


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid where CUDA is")
def test_fp16_without_a_gpu_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.precision=fp16"])
    assert str(err.value) == "optim.precision: fp16 needs a CUDA GPU (none here); use bf16 on CPU"


def test_fp16_is_refused_where_it_cannot_work():
    from hvd_trainer.strategies import strategy_class

    if torch.cuda.is_available():  # elsewhere the config refuses fp16 itself, before any strategy
        with pytest.raises(ConfigError, match="optim.precision: fp16 is not supported with strategy=ps"):
            strategy_class("ps").check(load_config(None, ["optim.precision=fp16", "strategy=ps"]), 3)
    with pytest.raises(ConfigError, match="model.recompute: not supported with model.sync_batchnorm"):
        load_config(None, ["model.recompute=true", "model.sync_batchnorm=true"])


def test_bf16_autocast_on_cpu_computes_in_bf16_and_keeps_fp32_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    p = Precision("bf16", torch.device("cpu"))
    with p.autocast():
        out = model(torch.randn(3, 8))
        loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2]))
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32
    p.backward(loss)
    assert model.weight.grad.dtype == torch.float32
    assert p.state_dict() == {"name": "bf16", "scaler": {}}


def _train(model, steps=4, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    shape = (16, 3, 12, 12)
    for i in range(steps):
        x, y = torch.randn(shape, generator=g), torch.randint(0, 10, (16,), generator=g)
        torch.manual_seed(100 + i)  # dropout draws
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.state_dict()


def _saved_bytes(model):
    """Bytes autograd keeps for backward over one forward pass (the activation memory)."""
    storages = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(16, 3, 12, 12)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(storages.values())


@pytest.mark.parametrize("make,kept", [(lambda r: ResNet(3, [8, 16], 2, 10, r), 0.35),
                                       (lambda r: MLP(3 * 12 * 12, [64, 32], 10, 0.2, r), 0.9)],
                         ids=["resnet", "mlp"])
def test_recompute_trains_bit_identically_and_keeps_less(make, kept):
    torch.manual_seed(0)
    plain = make(False)
    again = copy.deepcopy(plain)
    again.recompute = True
    a, b = _train(plain), _train(again)
    for name in a:  # the same arithmetic, run twice: exact, BatchNorm running stats included
        assert torch.equal(a[name], b[name]), name
    # only block inputs stay (the MLP's largest is its input, kept either way)
    assert _saved_bytes(again) < kept * _saved_bytes(plain)
    assert ResNet(3, [8], 1, 10, True).state_dict().keys() == ResNet(3, [8], 1, 10, False).state_dict().keys()

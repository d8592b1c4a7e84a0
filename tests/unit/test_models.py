"""The built-in models' contracts: their pipeline blocks are the forward pass and own every
parameter and buffer exactly once (under the model's own names), the transformer is causal,
recomputes exactly and initialises deterministically."""
import copy

import pytest
import torch

from hvd_trainer.config import ConfigError, load_config
from hvd_trainer.models import MLP, ResNet, Transformer, build_model


def _mlp():
    return MLP(3 * 6 * 6, [16, 8], 5, dropout=0.3), torch.randn(4, 3, 6, 6)


def _resnet():
    return ResNet(3, [4, 8], 2, 5), torch.randn(4, 3, 8, 8)


def _transformer():
    return Transformer(256, 12, 16, 3, 2, dropout=0.2), torch.randint(0, 256, (4, 12))


MODELS = pytest.mark.parametrize("make", [_mlp, _resnet, _transformer], ids=["mlp", "resnet", "transformer"])


def _chain(model, x):
    for _, block in model.pipeline_blocks():
        x = block(x)
    return x


@MODELS
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_pipeline_blocks_applied_in_order_are_the_forward_pass(make, train):
    torch.manual_seed(0)
    model, x = make()
    twin = copy.deepcopy(model)  # BatchNorm's running statistics move in train mode: one run each
    model.train(train)
    twin.train(train)
    torch.manual_seed(1)  # the same dropout masks for both
    expected = model(x)
    torch.manual_seed(1)
    got = _chain(twin, x)
    assert torch.equal(got, expected)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)  # the same buffer updates too


@MODELS
def test_every_parameter_and_buffer_is_in_exactly_one_block_under_its_own_name(make):
    model, _ = make()
    modules = dict(model.named_modules())
    blocks = model.pipeline_blocks()
    names = []
    for name, block in blocks:
        assert modules[name] is block  # the registered dotted path
        names += [f"{name}.{key}" for key in block.state_dict()]
    assert sorted(names) == sorted(model.state_dict())  # no key twice, none left out
    owned = [id(p) for _, block in blocks for p in block.parameters()]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())


def test_pipeline_block_names():
    mlp, resnet, tf = _mlp()[0], _resnet()[0], _transformer()[0]
    assert [n for n, _ in mlp.pipeline_blocks()] == [f"net.{i}" for i in range(len(mlp.net))]
    assert [n for n, _ in resnet.pipeline_blocks()] == ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "head"]
    assert [n for n, _ in tf.pipeline_blocks()] == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]


def test_resnet_head_keeps_its_checkpoint_names():
    keys = list(ResNet(3, [4], 1, 5).state_dict())
    assert keys[-2:] == ["head.weight", "head.bias"]


def test_transformer_is_causal_and_returns_class_dim_second():
    torch.manual_seed(0)
    model = Transformer(256, 16, 32, 2, 4).eval()
    x = torch.randint(0, 256, (2, 16))
    out = model(x)
    assert out.shape == (2, 256, 16)
    for t in (0, 7, 15):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % 256
        moved = model(changed)
        assert torch.equal(moved[:, :, :t], out[:, :, :t])  # nothing before t sees token t
        assert not torch.allclose(moved[:, :, t], out[:, :, t])  # and t itself does


def test_transformer_recompute_gives_the_same_gradients_with_dropout():
    torch.manual_seed(0)
    plain, x = _transformer()
    again = copy.deepcopy(plain)
    again.recompute = True
    grads = []
    for model in (plain, again):
        torch.manual_seed(3)
        torch.nn.functional.cross_entropy(model(x), x).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_build_model_transformer_is_seeded_and_checks_the_input_shape():
    cfg = load_config(None, ["model.name=transformer", "model.width=32", "model.heads=4", "model.layers=1"]).model
    torch.manual_seed(5)
    a = build_model(cfg, (24,), 256)
    torch.manual_seed(5)
    b = build_model(cfg, (24,), 256)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert a.embed.positions.num_embeddings == 24 and a.head.out.out_features == 256
    with pytest.raises(ConfigError, match=r"^model.name: transformer needs token sequences"):
        build_model(cfg, (1, 8, 8), 10)


@pytest.mark.parametrize("override,message", [
    (["model.heads=3"], "model.width: must be a multiple of model.heads (3), got 128"),
    (["model.width=30", "model.heads=4"], "model.width: must be a multiple of model.heads (4), got 30"),
    (["model.layers=0"], "model.layers:"),
    (["model.heads=0"], "model.heads:"),
])
def test_bad_transformer_shapes_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert message in str(err.value)

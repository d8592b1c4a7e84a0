import pytest

from hvd_trainer.cli import BUILTIN
from hvd_trainer.config import ConfigError, TrainConfig, load_config, replace
from hvd_trainer.strategies import strategy_class


def check_world(cfg, world_size):
    strategy_class(cfg.strategy).check(cfg, world_size)


def test_builtin_configs_load():
    for path in BUILTIN.glob("*.yaml"):
        assert isinstance(load_config(path), TrainConfig)


def test_overrides_reach_nested_keys_and_parse_yaml_scalars():
    cfg = load_config(None, ["optim.lr=0.2", "model.hidden=[8, 4]", "runtime.progress=false", "epochs=3"])
    assert cfg.optim.lr == 0.2 and cfg.model.hidden == [8, 4] and cfg.runtime.progress is False
    assert cfg.epochs == 3


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "optim.lrr: unknown key"),
    ("nope=1", "nope: unknown key"),
    ("epochs=1.5", "epochs:"),
    ("epochs=0", "epochs:"),
    ("optim.lr=0", "optim.lr:"),
    ("optim.lr=fast", "optim.lr:"),
    ("strategy=nccl", "strategy:"),
    ("runtime.progress=maybe", "runtime.progress:"),
    ("ps.staleness=-1", "ps.staleness: must be >= 0"),
    ("data.name=npz", "data.path: data.name=npz needs data.path"),
    ("horovod.op=adasum", "optim.lr_scaling:"),
    ("novalue", "overrides are KEY=VALUE"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_configs_are_frozen():
    cfg = load_config(None)
    with pytest.raises(Exception):
        cfg.epochs = 4


def test_world_checks():
    cfg = load_config(None, ["horovod.op=adasum", "optim.lr_scaling=none"])
    check_world(cfg, 4)
    with pytest.raises(ConfigError, match="power-of-two"):
        check_world(cfg, 3)
    ps = replace(cfg, strategy="ps", **{"ps.num_servers": 2})
    with pytest.raises(ConfigError, match="ps.num_servers"):
        check_world(ps, 2)
    with pytest.raises(ConfigError, match="ps.backup_workers"):
        check_world(replace(ps, **{"ps.backup_workers": 2}), 4)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)

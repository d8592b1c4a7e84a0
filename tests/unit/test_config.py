import pytest
from pydantic import ValidationError

from hvd_trainer.cli import BUILTIN
from hvd_trainer.config import ConfigError, TrainConfig, load_config, replace
from hvd_trainer.strategies import strategy_class


def check_world(cfg, world_size):
    strategy_class(cfg.strategy).check(cfg, world_size)


def test_builtin_configs_load():
    paths = sorted(BUILTIN.glob("*.yaml"))
    assert "digits.yaml" in [p.name for p in paths], BUILTIN  # the loop below checks something
    for path in paths:
        assert isinstance(load_config(path), TrainConfig)


def test_load_config_takes_a_builtin_name_as_hvd_train_does(tmp_path, monkeypatch, capsys):
    by_name = load_config("digits", ["epochs=3"])
    assert by_name == load_config(BUILTIN / "digits.yaml", ["epochs=3"])
    assert by_name.epochs == 3 and by_name.model.hidden == [128, 64]  # digits.yaml's, not the defaults
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").write_text("epochs: 7\n")  # a file of that name wins, as in the CLI
    assert load_config("digits").epochs == 7
    with pytest.raises(ConfigError, match=r"^config: no file 'nope' and no built-in config of that name \(built-in: .*digits"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config: no file"):
        load_config(tmp_path / "sub" / "digits")  # a path is a path: no built-in lookup
    from hvd_trainer.cli import main  # hvd-train resolves names through load_config too

    assert main(["nope"]) == 2
    assert "hvd-train: config error: config: no file 'nope' and no built-in config" in capsys.readouterr().err


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
    with pytest.raises(ValidationError, match="frozen"):
        cfg.epochs = 4
    with pytest.raises(ValidationError, match="frozen"):
        cfg.optim.lr = 1.0
    assert cfg.epochs == load_config(None).epochs and cfg.optim.lr == load_config(None).optim.lr


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


@pytest.mark.parametrize("written,key,value", [
    ("optim.lr=3e-4", "lr", 3e-4), ("optim.lr=1E-3", "lr", 1e-3), ("optim.lr=.5", "lr", 0.5),
    ("optim.lr=2.5e+1", "lr", 25.0), ("epochs=1_000", "epochs", 1000), ("epochs=1E3", "epochs", 1000),
    ("optim.lr=1", "lr", 1.0),
])
def test_numbers_are_read_as_a_python_user_writes_them(written, key, value):
    cfg = load_config(None, [written])
    got = getattr(cfg.optim if key == "lr" else cfg, key)
    assert got == value and type(got) is type(value)


def test_numbers_in_a_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 3e-4\n  weight_decay: 1E-5\nepochs: 2\n")
    cfg = load_config(f)
    assert cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 1e-5


@pytest.mark.parametrize("override,message", [
    ("optim.lr=.inf", "optim.lr:"), ("optim.weight_decay=.inf", "optim.weight_decay:"),
    ("optim.lr=.nan", "optim.lr:"), ("optim.warmup_epochs=.inf", "optim.warmup_epochs:"),
    ("horovod.fusion_threshold_mb=1.0e+308", "horovod.fusion_threshold_mb:"),
    ("seed=100000000000000000000", "seed:"), ("runtime.threads=100000000000000000000", "runtime.threads:"),
    ("horovod.cache_capacity=100000000000000000000", "horovod.cache_capacity:"),
    ("epochs=1.5", "epochs:"), ("model.hidden=[32, 100000000000000000000]", "model.hidden:"),
])
def test_values_that_cannot_be_meant_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message), err.value


def test_duplicate_keys_and_non_utf8_files_are_errors(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("optim:\n  lr: 0.3\nepochs: 2\noptim:\n  momentum: 0.5\n")
    with pytest.raises(ConfigError, match="optim: given twice"):
        load_config(f)
    g = tmp_path / "latin1.yaml"
    g.write_bytes("run_dir: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(g)


def test_first_difference_names_the_first_differing_dotted_key():
    from hvd_trainer.config import check_agreement, first_difference

    a = load_config(None, ["epochs=3"]).to_dict()
    b = load_config(None, ["epochs=2"]).to_dict()
    assert first_difference(a, a) is None
    assert first_difference(a, b) == ("epochs", 3, 2)
    c = load_config(None, ["model.hidden=[32]"]).to_dict()
    d = load_config(None, ["model.hidden=[64]"]).to_dict()
    assert first_difference(c, d) == ("model.hidden", [32], [64])
    with pytest.raises(ConfigError, match=r"^rank 2's config differs from rank 0's: epochs 2 vs 3$"):
        check_agreement([a, a, b], "config")


# --- the multi-rank config errors, case by case ------------------------------------------------
# tests/parallel runs one case of each under real ranks (exit 2, rank 0's one line, no hang);
# which key each case names is decided here, in one process, by the same code.

@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=0.1", "optim.lrr: unknown key"),
    ("epochs=ten", "epochs:"),
    ("optim.lr=-1", "optim.lr:"),
    ("data.name=npz", "data.path:"),
    ("data.path=/nonexistent.npz", "data.path: file not found"),
    ("horovod.op=adasum", "optim.lr_scaling:"),
])
def test_bad_config_is_one_line_exit_2_from_hvd_train(tmp_path, capsys, override, needle):
    from hvd_trainer.cli import main

    extra = ["data.name=npz"] if override.startswith("data.path") else []
    assert main(["digits", *extra, override, f"run_dir={tmp_path}"]) == 2
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hvd-train: config error: {needle}"), out.err
    assert "Traceback" not in out.out + out.err


@pytest.mark.parametrize("rank0,rank1,needle", [
    (["epochs=2"], ["epochs=3"], "rank 1's config differs from rank 0's: epochs 3 vs 2"),
    (["model.hidden=[32]"], ["model.hidden=[64]"], "rank 1's config differs from rank 0's: model.hidden [64] vs [32]"),
    (["strategy=horovod"], ["strategy=ddp"], "rank 1's config differs from rank 0's: strategy ddp vs horovod"),
    (["batch_size=16"], ["batch_size=32"], "rank 1's config differs from rank 0's: batch_size 32 vs 16"),
])
def test_ranks_launched_with_different_configs_get_the_first_difference(tmp_path, rank0, rank1, needle):
    from hvd_trainer.config import check_agreement

    # what each rank of `mpirun hvd-train digits ... : hvd-train digits ...` loads and gathers
    common = ["runtime.progress=false", f"run_dir={tmp_path}"]
    views = [load_config("digits", [*common, *rank0]).to_dict(), load_config("digits", [*common, *rank1]).to_dict()]
    check_agreement([views[0], views[0]], "config")  # the same config passes
    with pytest.raises(ConfigError) as err:
        check_agreement(views, "config")
    assert str(err.value) == needle


@pytest.mark.parametrize("override,needle", [
    ("ps.num_servers=3", "ps.num_servers: at most world size - 1 = 2, got 3"),
    ("ps.staleness=-1", "ps.staleness: must be >= 0"),
    ("ps.backup_workers=2", "ps.backup_workers: must be < number of workers (2), got 2"),
    ("optim.grad_clip=1", "optim.grad_clip:"),
])
def test_bad_ps_config_at_three_ranks_is_one_line_naming_the_key(override, needle):
    check_world(load_config("digits", ["strategy=ps"]), 3)  # the same world without the override passes
    with pytest.raises(ConfigError) as err:
        check_world(load_config("digits", ["strategy=ps", override]), 3)
    assert str(err.value).startswith(needle) and "\n" not in str(err.value), err.value

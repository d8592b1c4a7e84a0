"""Property-based tests of the config: generated valid input is read as a user means it, and
generated invalid input gets one line naming the problem (never a traceback)."""
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvd_trainer import cli
from hvd_trainer.config import INT_LIMIT, ConfigError, TrainConfig, load_config

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _float_spellings(x: float) -> list[str]:
    """How a Python/PyTorch user might write ``x``."""
    out = [repr(x), f"{x:e}", f"{x:E}", f"{x:.3e}".replace("e-0", "e-").replace("e+0", "e+")]
    if 0 < x < 1:
        out.append(repr(x).lstrip("0"))  # .5
    return out


def _leaves(model_cls, prefix=""):
    """(dotted key, annotation) of every setting."""
    for name, field in model_cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            yield from _leaves(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", ann


INT_KEYS = [k for k, a in _leaves(TrainConfig) if a is int]
FLOAT_KEYS = [k for k, a in _leaves(TrainConfig) if a is float]


@FAST
@given(st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False), st.data())
def test_every_spelling_of_a_float_is_the_number_meant(x, data):
    text = data.draw(st.sampled_from(_float_spellings(x)))
    cfg = load_config(None, [f"optim.lr={text}"])
    assert cfg.optim.lr == float(text)


@FAST
@given(st.integers(min_value=1, max_value=10**7), st.sampled_from(["plain", "underscores", "exponent", "float"]))
def test_every_spelling_of_an_int_is_the_number_meant(n, style):
    text = {"plain": str(n), "underscores": f"{n:_}", "exponent": f"{n:.6E}" if n < 10**6 else str(n),
            "float": f"{n}.0"}[style]
    if style == "exponent" and float(text) != n:
        text = str(n)
    cfg = load_config(None, [f"epochs={text}"])
    assert cfg.epochs == n and type(cfg.epochs) is int


@FAST
@given(st.floats(min_value=1e-9, max_value=10.0, allow_nan=False), st.integers(1, 50))
def test_numbers_in_a_yaml_file_read_the_same(tmp_path, lr, epochs):
    path = tmp_path / "c.yaml"
    path.write_text(f"epochs: {epochs}\noptim:\n  lr: {lr:e}\n")
    cfg = load_config(path)
    assert cfg.optim.lr == float(f"{lr:e}") and cfg.epochs == epochs


def _one_line_error(overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    message = str(err.value)
    assert "\n" not in message and message
    return message


@FAST
@given(st.sampled_from(INT_KEYS), st.one_of(st.integers(min_value=INT_LIMIT + 1), st.integers(max_value=-INT_LIMIT - 1)))
def test_huge_ints_are_refused_naming_the_key(key, value):
    assert _one_line_error([f"{key}={value}"]).startswith(f"{key}:")


@FAST
@given(st.sampled_from(FLOAT_KEYS), st.sampled_from([".inf", "-.inf", ".nan", "1e400", "-1e400"]))
def test_non_finite_floats_are_refused_naming_the_key(key, value):
    assert _one_line_error([f"{key}={value}"]).startswith(f"{key}:")


@FAST
@given(st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True))
def test_unknown_keys_are_named(name):
    known = {k.split(".")[0] for k, _ in _leaves(TrainConfig)}
    if name in known:
        return
    assert _one_line_error([f"{name}=1"]) == f"{name}: unknown key"


@FAST
@given(st.sampled_from([k for k, _ in _leaves(TrainConfig)]), st.text(max_size=20))
def test_any_value_for_any_key_is_accepted_or_one_line(key, raw):
    try:
        load_config(None, [f"{key}={raw}"])
    except ConfigError as err:
        assert "\n" not in str(err)


@FAST
@given(st.binary(max_size=200))
def test_any_file_content_loads_or_is_one_line(tmp_path, blob):
    path = tmp_path / "any.yaml"
    path.write_bytes(blob)
    try:
        cfg = load_config(path)
    except ConfigError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(cfg, TrainConfig)


@pytest.mark.parametrize("text,needle", [
    ("- 1\n- 2\n", "mapping"), ("3\n", "mapping"), ("epochs: [1,\n", "not valid YAML"),
    ("epochs: 2\nepochs: 3\n", "epochs: given twice"),
])
def test_malformed_files(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert needle in _one_line_error(path=path)


def test_empty_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == load_config(None)


def test_missing_file_and_cli_exit_code(tmp_path, capsys):
    assert cli.main([str(tmp_path / "nope.yaml")]) == 2
    assert cli.main(["digits", "optim.lr=.inf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("hvd-train: config error: ") for line in err)
    assert "optim.lr:" in err[1]


def test_yaml_1_1_would_have_read_these_as_strings():
    # the reason for the custom loader: keep this fact visible
    assert yaml.safe_load("3e-4") == "3e-4" and yaml.safe_load("1E6") == "1E6"
    assert math.isclose(load_config(None, ["optim.lr=3e-4"]).optim.lr, 3e-4)

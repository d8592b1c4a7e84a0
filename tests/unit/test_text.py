"""data.name: text: byte windows split without overlap, the default text from Python's standard
library, the unigram baseline in closed form, and a small transformer that beats it through the
real train() path (with perplexity and per-token accuracy in its evaluation)."""
import json
import math

import numpy as np
import pytest
import torch

from hvd_trainer.config import ConfigError, load_config
from hvd_trainer.data import build_splits
from hvd_trainer.data.text import read_bytes, stdlib_sources, unigram_perplexity
from hvd_trainer.runner import train
from hvd_trainer.strategies.base import unwrap

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs", "far", "away"]


def _write_text(folder, files=3, words=4000, seed=0):
    """Seeded sentences of a few words: text a small model learns quickly."""
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    for i in range(files):
        sentences = [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) + ".\n" for _ in range(words // 6)]
        (folder / f"part{i}.txt").write_text("".join(sentences))
    return folder


def _data(*extra):
    return load_config(None, ["data.name=text", *extra]).data


def test_windows_split_the_stream_at_the_end_without_overlap(tmp_path):
    root = _write_text(tmp_path / "t")
    cfg = _data(f"data.path={root}/*.txt", "data.seq_len=16", "data.text_bytes=0", "data.test_fraction=0.25")
    splits = build_splits(cfg, seed=0)
    stream = b"".join(p.read_bytes() for p in sorted(root.glob("*.txt")))  # sorted, concatenated
    n_test = round(len(stream) * 0.25)
    for ds, part in ((splits.train, stream[:len(stream) - n_test]), (splits.test, stream[len(stream) - n_test:])):
        x, y = ds.tensors
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == 16
        assert len(x) == len(part) // 17
        assert torch.equal(x[:, 1:], y[:, :-1])  # the targets are the inputs shifted by one
        windows = torch.cat([x, y[:, -1:]], dim=1)  # each window's 17 bytes, none shared
        assert bytes(windows.flatten().tolist()) == part[:len(x) * 17]
    assert splits.input_shape == (16,) and splits.num_classes == 256
    assert splits.info["text_files"] == [str(p) for p in sorted(root.glob("*.txt"))]
    assert splits.info["text_bytes"] == len(stream)


def test_text_bytes_caps_the_stream_and_lists_the_files_read(tmp_path):
    root = _write_text(tmp_path / "t")
    first = sorted(root.glob("*.txt"))[0]
    splits = build_splits(_data(f"data.path={root}/*.txt", "data.text_bytes=1000"), seed=0)
    assert splits.info["text_bytes"] == 1000 and splits.info["text_files"] == [str(first)]


def test_a_glob_matching_nothing_names_data_path(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.path: no file matches .*nothing-\*\.txt$"):
        _data(f"data.path={tmp_path}/nothing-*.txt")
    with pytest.raises(ConfigError, match=r"^data.path: no file matches"):
        _data(f"data.path={tmp_path}")  # a folder is not a text file


@pytest.mark.parametrize("override,message", [("data.seq_len=0", "data.seq_len:"),
                                               ("data.text_bytes=-1", "data.text_bytes:")])
def test_bad_text_settings_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        _data(override)
    assert str(err.value).startswith(message)


def test_too_little_text_for_one_window_is_a_config_error(tmp_path):
    (tmp_path / "a.txt").write_text("short text")
    with pytest.raises(ConfigError, match=r"^data.path: 10 bytes of text leave no window"):
        build_splits(_data(f"data.path={tmp_path}/a.txt", "data.seq_len=8"), seed=0)


def test_the_default_is_python_stdlib_source_offline():
    files = []
    for path in stdlib_sources():
        files.append(path)
        if len(files) == 5:
            break
    assert files == sorted(files, key=lambda p: p.parts) and all(p.suffix == ".py" for p in files)
    splits = build_splits(_data("data.text_bytes=20000", "data.seq_len=32"), seed=0)
    assert splits.info["text_bytes"] == 20000 and splits.info["text_source"].startswith("python stdlib")
    stream, _ = read_bytes(iter(files), 0)
    x, y = splits.train.tensors
    assert bytes(x[0].tolist()) == stream[:32].tobytes()  # the first file's first bytes
    assert b"import" in bytes(x.flatten().tolist())


def test_unigram_perplexity_in_closed_form():
    train = np.frombuffer(b"aaab", dtype=np.uint8)
    # add-one over 256 bytes: p(a) = 4/260, p(b) = 2/260; held out "ab": exp(-mean log p)
    assert unigram_perplexity(train, np.frombuffer(b"ab", dtype=np.uint8)) == pytest.approx(260 / math.sqrt(8))
    assert unigram_perplexity(train, np.frombuffer(b"zz", dtype=np.uint8)) == pytest.approx(260.0)


def test_the_summary_baseline_is_fitted_on_train_and_scored_on_the_held_out_targets(tmp_path):
    root = _write_text(tmp_path / "t")
    splits = build_splits(_data(f"data.path={root}/*.txt", "data.seq_len=16", "data.text_bytes=0"), seed=0)
    stream = np.frombuffer(b"".join(p.read_bytes() for p in sorted(root.glob("*.txt"))), dtype=np.uint8)
    train_part = stream[:len(stream) - round(len(stream) * 0.2)]
    expected = unigram_perplexity(train_part, splits.test.tensors[1].numpy().ravel())
    assert splits.info["unigram_perplexity"] == pytest.approx(expected, abs=1e-4)


def test_a_small_transformer_beats_the_unigram_baseline_through_train(tmp_path):
    root = _write_text(tmp_path / "t")
    cfg = load_config(None, [
        "strategy=single", "data.name=text", f"data.path={root}/*.txt", "data.seq_len=32", "data.text_bytes=0",
        "model.name=transformer", "model.layers=1", "model.heads=2", "model.width=32", "optim.name=adam",
        "optim.lr=0.003", "batch_size=16", "epochs=1", "runtime.progress=false", "checkpoint.every_epochs=0",
        f"run_dir={tmp_path / 'run'}"])
    seen = {}

    def score(trainer):
        model = unwrap(trainer.state.model).eval()
        x, y = trainer.data.test.tensors
        with torch.no_grad():
            seen["acc"] = float((model(x).argmax(1) == y).float().mean())
        seen["windows"] = len(y)

    summary = train(cfg, on_end=score)
    baseline = summary["data"]["unigram_perplexity"]
    assert summary["final_test_perplexity"] == pytest.approx(math.exp(summary["final_test_loss"]))
    assert summary["final_test_perplexity"] < 0.3 * baseline, (summary["final_test_perplexity"], baseline)
    assert summary["final_test_accuracy"] == pytest.approx(seen["acc"], abs=1e-6)  # per token
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_samples"] for r in rows if "test_samples" in r] == [seen["windows"]]  # samples, not tokens
    assert summary["steps"] > 30

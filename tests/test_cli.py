"""The LightningCLI path end to end: `fit --config <yaml>` from examples/ naming `lightning_snip.SNIPPruning`."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test runs the example in a new process

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


def test_bad_yaml_value_is_rejected_at_parse_time(tmp_path):
    result = _run(tmp_path, "--trainer.callbacks.init_args.criterion=grasp")
    assert result.returncode != 0
    assert "criterion" in result.stderr

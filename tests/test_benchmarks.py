"""The benchmarks behind the README's overhead figures run, and report what the README reads from them."""

import math
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gradient_masking_floor  # noqa: E402


@pytest.mark.parametrize(
    ("arm", "passes"),
    [
        ("dense", 0),
        ("after backward", 1),
        ("in backward", 0),
        ("float mask after backward", 0),
        ("after backward, twice", 2),
        ("after backward, gradients read first", 1),
        ("after backward, masks read first", 1),
    ],
)
def test_gradient_masking_floor_times_each_pass_of_its_arm(arm: str, passes: int) -> None:
    step, pass_times = gradient_masking_floor.run(arm, steps=3)
    assert 1e-6 < step < 1.0  # a LeNet-300-100 step at batch 100, in seconds: microseconds to milliseconds
    assert len(pass_times) == passes
    assert all(0 < t < step for t in pass_times)  # timed inside the step
    assert sum(pass_times) < step


def test_gradient_masking_floor_refuses_an_unknown_arm() -> None:
    with pytest.raises(ValueError, match=r"`arm` must be one of .*got 'after backwards'"):
        gradient_masking_floor.run("after backwards", steps=1)


@pytest.mark.slow
def test_gradient_masking_floor_prints_every_arm_against_dense(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["gradient_masking_floor.py", "--rounds", "2", "--steps", "2"])
    gradient_masking_floor.main()
    rows = {
        match[1]: match.groups()[1:]
        for match in re.finditer(r"^\| ([^|]+?) \| (\d+) µs \| ([\d.]+) \| ([^|]+) \|$", capsys.readouterr().out, re.M)
    }
    assert list(rows) == list(gradient_masking_floor.ARMS)
    assert rows["dense"][1] == "1.000"
    assert rows["dense"][2] == "-"
    assert re.fullmatch(r"\d+ µs", rows["after backward"][2])
    assert re.fullmatch(r"\d+ µs, \d+ µs", rows["after backward, twice"][2])


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["none", "csv", "tensorboard"])
def test_training_overhead_user_view_reports_four_arms_and_the_hooks(tmp_path: Path, logger: str) -> None:
    import training_overhead

    result = training_overhead.user_view("lenet300", rounds=1, steps=50, root=str(tmp_path), logger=logger)
    assert result["logger"] == logger
    assert 0.01 < result["dense_ms"] < 1000  # a LeNet-300-100 step, in milliseconds
    for arm in ("masked", "empty", "snip"):
        assert len(result[f"{arm}_ratios"]) == 1
        assert result[f"{arm}_ratio"] == result[f"{arm}_ratios"][0]  # one round: its ratio is the median
        assert math.isfinite(result[f"{arm}_ratio"])  # no range: a timing on a shared CPU can be anything
        assert result[f"{arm}_ratio"] > 0
    assert "on_after_backward" in result["per_step_us"]  # where the gradients are masked
    table = training_overhead.user_table({"lenet300": result}, threads=1)
    assert "<= 1.05" in table
    assert ("`logger=False`" in table) == (logger == "none")
    versions = sorted(tmp_path.glob("user/version_*"))
    logged = sorted(tmp_path.glob("user/version_*/metrics.csv"))
    if logger == "none":
        assert not versions
    elif logger == "tensorboard":
        assert len(versions) == 5  # one per fit: dense, masked, empty, SNIPPruning, hook-timed SNIPPruning
        assert all(list(version.glob("events.out.tfevents.*")) for version in versions)
    else:  # SNIPPruning's fits logged the sparsity at the step Lightning logs at (50); the others logged nothing
        assert len(versions) == 5
        sparsity = [path for path in logged if "snip/sparsity" in path.read_text().splitlines()[0].split(",")]
        assert len(sparsity) == 2


def test_training_overhead_refuses_an_unknown_logger(tmp_path: Path) -> None:
    import training_overhead

    with pytest.raises(ValueError, match="logger='wandb' is not one of"):
        training_overhead._logger("wandb", str(tmp_path))


@pytest.mark.slow
def test_structured_training_times_dense_and_each_channel_sparsity(tmp_path: Path) -> None:
    import structured_training

    result = structured_training.measure("lenet5", [0.5], rounds=1, steps=2, scope="layerwise", batch=16)
    dense, half = result["arms"]["dense"], result["arms"]["channel 50%"]
    assert dense["params"] == 431_080
    assert half["params"] == 109_295
    assert half["params_ratio"] == pytest.approx(109_295 / 431_080)
    assert half["macs"] < dense["macs"]
    assert dense["speedup"] == 1.0
    assert half["speedup"] == half["speedups"][0]
    # the ratio is dense's step time over the arm's (one round: their medians); its size is the benchmark's to report,
    # not a unit test's to bound (a loaded machine moves it)
    assert 0 < dense["step_ms"] < float("inf")
    assert 0 < half["step_ms"] < float("inf")
    assert half["speedup"] == pytest.approx(dense["step_ms"] / half["step_ms"])
    table = structured_training.table([result])
    assert "| lenet5 (batch 16, layerwise) | channel 50% | 109,295 (0.25x) |" in table


@pytest.mark.slow
def test_sparse_inference_reports_every_arm_and_file(capsys: pytest.CaptureFixture[str]) -> None:
    import sparse_inference

    argv = ["--networks", "lenet300", "conv1x1", "--patterns", "cfi:0.95", "--batches", "1", "--threads", "1"]
    results = sparse_inference.main([*argv, "--rounds", "1"])
    sizes = {r["network"]: r for r in results["sizes"]}
    lenet = sizes["LeNet-300-100"]
    assert lenet["dense_pt"] / lenet["safetensors"] > 10  # 95% zeros: about 12x smaller
    assert lenet["onnx_plain"] / lenet["onnx_sparse"] > 5
    for row in results["latency"]:
        assert set(row) >= {"sparsify", "csr", "numba", "dense_ms", "chosen", "sparsify_vs_csr"}
        assert row["sparsify"]["speedup"] == row["sparsify"]["speedup_min"]  # one round: its ratio is the median
        assert row["sparsify_vs_csr"]["speedup"] > 0
        assert 0.05 < row["sparsify"]["speedup"] < 50
    out = capsys.readouterr().out
    assert "| LeNet-300-100 | 95% constant fan-in | 1.07 MB |" in out
    assert "ResNet-50 1x1 convolutions" in out


@pytest.mark.parametrize("block_ms", [0.0, 20.0])
def test_sparse_inference_sizes_each_arms_block_to_its_own_speed(block_ms: float) -> None:
    import time

    import sparse_inference
    import torch

    made = {"dense": 0, "sparsify": 0}

    def arm(name: str, seconds: float):
        def call() -> None:
            made[name] += 1
            time.sleep(seconds)

        return call

    arms = {"dense": arm("dense", 0.004), "sparsify": arm("sparsify", 0.0)}
    result = sparse_inference.interleaved(arms, rounds=3, device=torch.device("cpu"), block_s=block_ms / 1e3)
    calls = result["calls_per_block"]
    if block_ms == 0:
        assert calls == {"dense": 1, "sparsify": 1}  # one call a block: a cold start after the other arm
    else:
        assert calls["dense"] <= 5  # a 4 ms call fills a 20 ms block in about 5 calls
        assert calls["sparsify"] > 10 * calls["dense"]  # the fast arm runs back to back
    for name in arms:  # a warm-up call, the call that sizes the block, then the rounds
        assert made[name] == 2 + 3 * calls[name]
    assert result["sparsify"]["ms"] < result["dense_ms"]


def test_sparse_inference_turns_the_order_of_the_arms_every_round() -> None:
    import sparse_inference
    import torch

    order: list[str] = []
    arms = {name: (lambda n: lambda: order.append(n))(name) for name in ("dense", "csr", "sparsify")}
    result = sparse_inference.interleaved(arms, rounds=4, device=torch.device("cpu"), block_s=0.0)
    assert order[:6] == ["dense", "dense", "csr", "csr", "sparsify", "sparsify"]  # warm-up and sizing call each
    rounds = [order[6 + 3 * r : 9 + 3 * r] for r in range(4)]
    assert rounds == [
        ["dense", "csr", "sparsify"],
        ["csr", "sparsify", "dense"],
        ["sparsify", "dense", "csr"],
        ["dense", "csr", "sparsify"],
    ]
    assert {len(t) for t in result["_times"].values()} == {4}
    order.clear()  # two arms alternate strictly: each block follows the other arm's (a cold start with --block-ms 0)
    sparse_inference.interleaved(dict(list(arms.items())[:2]), rounds=3, device=torch.device("cpu"), block_s=0.0)
    assert order[4:] == ["dense", "csr"] * 3


def test_block_sparse_times_every_arm_on_block_masked_weights(capsys: pytest.CaptureFixture[str]) -> None:
    import block_sparse
    import torch

    weight = block_sparse.block_masked_weight(64, 8, 0.75)
    tiles = (weight.view(8, 8, 8, 8).transpose(1, 2) != 0).flatten(2).any(-1)  # which 8x8 tiles hold any value
    assert int(tiles.sum()) == 16  # a quarter of the 64 tiles
    assert torch.equal((weight != 0).sum(), torch.tensor(16 * 64))  # kept tiles are full
    results = block_sparse.main(["--size", "256", "--blocks", "4", "16", "--batches", "1", "3", "--rounds", "1"])
    assert [(r["block"], r["batch"]) for r in results["rows"]] == [(4, 1), (4, 3), (16, 1), (16, 3)]
    for row in results["rows"]:
        assert row["dense_ms"] > 0
        assert all(row[arm] > 0 for arm in ("bsr", "csr", "sparsify"))
        assert row["sparsify_kernel"] in ("dense", "csr", "numba", "bsr")
    assert "| 16x16 | 95% | 3 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        block_sparse.main(["--size", "100", "--blocks", "16"])  # 16 does not divide 100

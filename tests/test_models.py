"""Real architectures: torchvision CNNs, an LSTM, a Transformer LM with tied weights, lazily built layers."""

import re
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from helpers import ZeroInvariantChecker, fit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_snip import SNIPPruning
from lightning_snip.selection import kept_count


class Wrapped(pl.LightningModule):
    def __init__(self, net: nn.Module, loss: Callable[[Any, Any], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.net = net
        self.loss = loss or (lambda out, y: nn.functional.cross_entropy(out, y))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def _images(n: int, size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)), batch_size=4
    )


def _check(model: pl.LightningModule, pruning: SNIPPruning, loader: DataLoader, **kwargs: Any) -> ZeroInvariantChecker:
    bn_before = {n: b.clone() for n, b in model.named_buffers()}
    checker = ZeroInvariantChecker(pruning)

    class BuffersAtFitStart(pl.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            for name, buffer in pl_module.named_buffers():
                assert torch.equal(buffer, bn_before[name]), f"{name} changed during scoring"

    fit(model, [pruning, BuffersAtFitStart(), checker], loader, **kwargs)
    assert checker.violations == [0] * (checker.batches + 1)
    total = sum(m.numel() for m in pruning.masks.values())
    assert sum(int(m.sum()) for m in pruning.masks.values()) == kept_count(total, pruning.sparsity)
    return checker


TORCHVISION = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 2, []),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=10), 1, []),  # 129M weights: one batch is enough
    # at 95%, SNIP prunes the squeeze-excitation layers of two blocks entirely, and says so
    "mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
        2,
        [f"features.{b}.block.2.{fc}.weight" for b in (10, 11) for fc in ("fc1", "fc2")],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize(("build", "batches", "collapsed"), TORCHVISION.values(), ids=TORCHVISION.keys())
def test_torchvision_models(build, batches, collapsed):
    torch.manual_seed(0)
    net = build()
    expected = {f"net.{n}.weight" for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    pruning = SNIPPruning(sparsity=0.95)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check(Wrapped(net), pruning, _images(4 * batches, 32), limit_train_batches=batches)
    warned = sorted(
        m.group(1) for w in caught if (m := re.search(r"`net\.(\S+)` .* is pruned entirely", str(w.message)))
    )
    assert warned == sorted(collapsed)
    assert all(not pruning.masks[f"net.{name}"].any() for name in collapsed)
    assert set(pruning.masks) == expected


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


def test_lstm():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(
        TensorDataset(torch.randint(0, 50, (16, 12), generator=g), torch.randint(0, 3, (16,), generator=g)),
        batch_size=8,
    )
    pruning = SNIPPruning(sparsity=0.9)
    _check(Wrapped(LSTMClassifier()), pruning, loader, max_epochs=2)
    assert sorted(pruning.masks) == sorted(
        ["net.embed.weight", "net.head.weight"]
        + [f"net.lstm.weight_{kind}_l{layer}" for kind in ("ih", "hh") for layer in (0, 1)]
    )


class TinyLM(nn.Module):
    """A causal Transformer language model whose output projection is tied to its embedding."""

    def __init__(self, vocab: int = 40, dim: int = 32, seq: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        return self.head(self.norm(self.encoder(h, mask=self.causal_mask, is_causal=True)))


def test_transformer_lm_with_tied_weights_and_a_causal_mask_buffer():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (16, 17), generator=g)
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)
    model = Wrapped(TinyLM(), loss=lambda logits, y: nn.functional.cross_entropy(logits.transpose(1, 2), y))
    keys_before = list(model.state_dict())
    causal = model.net.causal_mask.clone()
    pruning = SNIPPruning(sparsity=0.8)
    with pytest.warns(UserWarning, match=r"`net\.pos` \(1, 16, 32\) is pruned entirely"):
        _check(model, pruning, loader, max_epochs=2)

    assert "net.head.weight" not in pruning.masks  # tied: one candidate under its canonical name
    assert "net.embed.weight" in pruning.masks
    assert model.net.head.weight is model.net.embed.weight
    assert {
        "net.encoder.layers.0.self_attn.in_proj_weight",
        "net.encoder.layers.0.self_attn.out_proj.weight",
        "net.encoder.layers.1.linear2.weight",
        "net.pos",
    } <= set(pruning.masks)
    assert not any("norm" in n or "bias" in n or "causal_mask" in n for n in pruning.masks)
    assert torch.equal(model.net.causal_mask, causal)
    assert list(model.state_dict()) == keys_before
    plain = Wrapped(TinyLM())
    plain.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(plain.net.head.weight == 0, ~pruning.masks["net.embed.weight"] | (plain.net.head.weight == 0))


class BuiltInConfigureModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_layers_built_in_configure_model():
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(
        TensorDataset(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)), batch_size=8
    )
    pruning = SNIPPruning(sparsity=0.9)
    _check(BuiltInConfigureModel(), pruning, loader)
    assert sorted(pruning.masks) == ["net.0.weight", "net.2.weight"]

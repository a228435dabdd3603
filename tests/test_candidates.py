import pytest
from torch import nn

from lightning_snip import find_candidates


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.ln = nn.LayerNorm([8, 8])  # a 2-D norm weight: still not a candidate
        self.rnn = nn.GRU(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True)  # bias_k/bias_v are 3-D
        self.head = nn.Linear(8, 10)
        self.head.weight = self.emb.weight  # tied
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_default_rule():
    names = list(find_candidates(Mixed()))
    assert names == [
        "emb.weight",
        "conv.weight",
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
    ]


def test_tied_weight_is_one_candidate_and_matches_any_alias():
    model = Mixed()
    assert "head.weight" not in find_candidates(model)
    assert list(find_candidates(model, include=["head.weight"])) == ["emb.weight"]
    assert "emb.weight" not in find_candidates(model, exclude=["head.*"])


def test_include_may_name_biases_and_exclude_removes():
    model = Mixed()
    assert list(find_candidates(model, include=["conv.*"])) == ["conv.weight", "conv.bias"]
    assert list(find_candidates(model, include=["conv.*"], exclude=["*.bias"])) == ["conv.weight"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"include": ["nope.*"]}, r"`include` pattern 'nope\.\*' matches no parameter"),
        ({"exclude": ["typo"]}, r"`exclude` pattern 'typo' matches no parameter"),
        ({"include": ["frozen.*"]}, r"No parameter is a pruning candidate.*frozen"),
        ({"exclude": ["*"]}, r"No parameter is a pruning candidate"),
    ],
    ids=["include-typo", "exclude-typo", "only-frozen", "all-excluded"],
)
def test_bad_patterns(kwargs, match):
    with pytest.raises(ValueError, match=match):
        find_candidates(Mixed(), **kwargs)

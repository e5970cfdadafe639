"""ladle.recalibrate_bn: BatchNorm statistics recomputed for averaged weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ladle import recalibrate_bn
from ladle.averaging.bn import has_batchnorm
from ladle.errors import ConfigError


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Identity(), nn.BatchNorm1d(2))
    bn = net[1]
    bn.running_mean.fill_(100.0)
    bn.running_var.fill_(100.0)
    bn.momentum = 0.3
    return net


BATCHES = [torch.tensor([[0.0, 2.0], [2.0, 2.0]]), torch.tensor([[4.0, 6.0], [6.0, 6.0]])]


def test_statistics_become_the_cumulative_average_over_the_data() -> None:
    net = _net()
    assert recalibrate_bn(net, BATCHES) == 1
    bn = net[1]
    # batch means (1, 2) and (5, 6); unbiased batch variances (2, 0) and (2, 0)
    assert bn.running_mean.tolist() == [3.0, 4.0]
    assert bn.running_var.tolist() == [2.0, 0.0]
    assert bn.num_batches_tracked.item() == 2
    assert bn.momentum == 0.3


def test_input_target_pairs_and_max_batches() -> None:
    net = _net()
    recalibrate_bn(net, [(b, torch.zeros(2)) for b in BATCHES], max_batches=1)
    assert net[1].running_mean.tolist() == [1.0, 2.0]


def test_custom_batches_go_through_forward() -> None:
    net = _net()
    batches = [{"x": b, "label": 0} for b in BATCHES]
    recalibrate_bn(net, batches, forward=lambda model, batch: model(batch["x"]), device="cpu")
    assert net[1].running_mean.tolist() == [3.0, 4.0]


@pytest.mark.parametrize("forward", [None, lambda model, batch: model(batch)])
def test_the_models_mode_is_restored(forward) -> None:  # type: ignore[no-untyped-def]
    net = _net().eval()
    recalibrate_bn(net, BATCHES, forward=forward)
    assert not net.training
    assert not net[1].training


def test_a_model_without_batchnorm_is_left_alone() -> None:
    net = nn.Linear(2, 2)
    assert not has_batchnorm(net)
    assert recalibrate_bn(net, BATCHES) == 0


def test_bad_max_batches_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_batches=0 must be a whole number of at least 1"):
        recalibrate_bn(_net(), BATCHES, max_batches=0)

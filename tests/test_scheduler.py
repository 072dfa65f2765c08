"""Tests of scheduler.py: the learning rate over a run (linear warm-up, then constant or cosine
decay to 0), each group's share of it (--probe-epochs) and the optimizer's parameter groups
(--backbone-lr-scale, 0 freezing the backbone)."""
import dataclasses

import pytest
import torch
import torch.nn as nn

from config import RunConfig
from losses import build_model
from scheduler import learning_rate, parameter_groups, set_learning_rates


def rates(config, total_steps):
    return [learning_rate(step, total_steps, config) for step in range(total_steps)]


# ---------------------------------------------------------------------------------------------
# learning_rate


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_zero():
    config = RunConfig(lr=1e-3, epochs=4, warmup_epochs=1.0, schedule="cosine")
    lr = rates(config, 400)
    assert lr[0] == pytest.approx(1e-5) and lr[99] == pytest.approx(1e-3)  # 100 warm-up steps
    assert [lr[i] for i in (24, 49, 74)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])  # a straight line from 0
    assert all(a < b for a, b in zip(lr[:99], lr[1:100]))
    assert lr[100] == pytest.approx(1e-3)  # the peak, where the cosine starts
    assert all(a > b for a, b in zip(lr[100:], lr[101:]))
    assert lr[250] == pytest.approx(5e-4, rel=0.02)  # half-way through the decay: half the peak
    assert lr[-1] < 1e-6
    assert learning_rate(400, 400, config) == pytest.approx(0.0, abs=1e-12)  # 0 at the end of the run
    assert learning_rate(450, 400, config) == pytest.approx(0.0, abs=1e-12)  # and not back up past it


def test_cosine_without_warm_up_starts_at_the_peak():
    config = RunConfig(lr=2e-3, epochs=2, warmup_epochs=0.0, schedule="cosine")
    lr = rates(config, 100)
    assert lr[0] == 2e-3 and lr[50] == pytest.approx(1e-3) and lr[-1] < 2e-6


def test_constant_schedule_keeps_the_peak_after_the_warm_up():
    config = RunConfig(lr=1e-3, epochs=4, warmup_epochs=0.0, schedule="constant")
    assert set(rates(config, 400)) == {1e-3}
    warm = dataclasses.replace(config, warmup_epochs=2.0)
    lr = rates(warm, 400)
    assert lr[0] == pytest.approx(5e-6) and lr[199] == pytest.approx(1e-3)  # 200 warm-up steps
    assert all(a < b for a, b in zip(lr[:199], lr[1:200]))
    assert set(lr[199:]) == {1e-3}


def test_warm_up_is_counted_in_epochs_of_the_run():
    """The same warm-up epochs over runs of other lengths cover the same share of each epoch's steps."""
    config = RunConfig(lr=1e-3, epochs=10, warmup_epochs=0.5, schedule="constant")
    assert learning_rate(49, 1000, config) == pytest.approx(1e-3)  # half of an epoch of 100 steps
    assert learning_rate(48, 1000, config) < 1e-3
    assert learning_rate(4, 100, config) == pytest.approx(1e-3)  # half of an epoch of 10 steps


# ---------------------------------------------------------------------------------------------
# parameter_groups


class Tiny(nn.Module):
    """A backbone and what sits on it, as each network of modules.py has."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.backbone(x)).squeeze(1)


def ids(parameters):
    return {id(p) for p in parameters}


def test_scale_one_is_one_group_of_every_parameter():
    model = Tiny()
    groups = parameter_groups(model, 1.0)
    assert len(groups) == 1 and groups[0]["lr_scale"] == 1.0
    assert ids(groups[0]["params"]) == ids(model.parameters())


def test_a_fractional_scale_puts_the_backbone_in_its_own_group():
    model = Tiny()
    backbone, head = parameter_groups(model, 0.25)
    assert backbone["lr_scale"] == 0.25 and head["lr_scale"] == 1.0
    assert ids(backbone["params"]) == ids(model.backbone.parameters())
    assert ids(head["params"]) == ids(model.head.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_scale_zero_freezes_the_backbone_and_leaves_it_out_of_the_groups():
    model = Tiny()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    groups = parameter_groups(model, 0.0)
    assert len(groups) == 1 and groups[0]["lr_scale"] == 1.0
    assert ids(groups[0]["params"]) == ids(model.head.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    # a training step moves the head only
    optimizer = torch.optim.SGD(groups, lr=0.1)
    model(torch.randn(8, 4, generator=torch.Generator().manual_seed(0))).square().mean().backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == name.startswith("backbone."), name


@pytest.mark.parametrize("loss", ["bce", "triplet", "ce"])
def test_groups_of_every_network_split_it_at_its_backbone(loss):
    config = RunConfig(loss=loss, weights="none", embed_dim=8, aux_weight=1.0 if loss == "bce" else 0.0)
    model = build_model(config)
    backbone, rest = parameter_groups(model, 0.5)
    assert ids(backbone["params"]) == ids(model.backbone.parameters())
    assert ids(backbone["params"]) | ids(rest["params"]) == ids(model.parameters())
    assert not ids(backbone["params"]) & ids(rest["params"]) and rest["params"]


# ---------------------------------------------------------------------------------------------
# set_learning_rates: --probe-epochs


def test_a_probe_gives_the_backbone_no_learning_rate_for_its_epochs_then_the_schedule():
    config = RunConfig(lr=1e-3, epochs=4, probe_epochs=1, warmup_epochs=0.5, schedule="cosine")
    model = Tiny()
    groups = parameter_groups(model, 1.0, probe=True)  # scale 1, yet the backbone in a group of its own
    assert [g["backbone"] for g in groups] == [True, False]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    seen = []
    for step in range(40):  # 10 steps an epoch
        set_learning_rates(optimizer, step, 40, config)
        seen.append([g["lr"] for g in optimizer.param_groups])
    assert all(backbone == 0.0 for backbone, _ in seen[:10])
    assert [backbone for backbone, _ in seen[10:]] == [head for _, head in seen[10:]] == rates(config, 40)[10:]
    assert [head for _, head in seen[:10]] == rates(config, 40)[:10] and seen[9][1] > 0

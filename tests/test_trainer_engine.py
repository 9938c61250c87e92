"""The optimizer's states are made before the first step, and training is the same as with lazy states."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from runner.trainer.engine import init_optimizer_state, make_optimizer

CPU = torch.device("cpu")


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))


def train(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    torch.manual_seed(1)
    device = next(net.parameters()).device
    for _ in range(steps):
        inputs, targets = torch.randn(8, 16).to(device), torch.randint(0, 4, (8,)).to(device)
        nn.functional.cross_entropy(net(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fused AdamW)")


@pytest.mark.parametrize("kind, device", [("adamw", "cpu"), ("sgd", "cpu"),
                                          pytest.param("adamw", "cuda", marks=CUDA)])
def test_training_after_the_states_are_made_early_is_bit_for_bit_the_lazy_training(kind, device):
    device = torch.device(device)
    lazy, early = model().to(device), model().to(device)
    lazy_opt = make_optimizer(list(lazy.parameters()), kind, 1e-2, 0.1, device)
    early_opt = make_optimizer(list(early.parameters()), kind, 1e-2, 0.1, device)
    init_optimizer_state(early_opt)
    train(lazy, lazy_opt, 5)
    train(early, early_opt, 5)
    for a, b in zip(lazy.parameters(), early.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(lazy_opt.state.values(), early_opt.state.values(), strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_states_are_zero_moments_at_step_0_and_no_weight_or_gradient_is_left_changed():
    net = model()
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = make_optimizer(list(net.parameters()), "adamw", 1e-2, 0.1, CPU)
    init_optimizer_state(optimizer)
    assert [p.grad for p in net.parameters()] == [None] * len(before)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))
    assert optimizer.param_groups[0]["lr"] == 1e-2
    for p in net.parameters():
        state = optimizer.state[p]
        assert state["exp_avg"].shape == p.shape and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
        assert float(state["step"]) == 0.0


def test_a_resumed_optimizers_states_are_kept():
    net = model()
    optimizer = make_optimizer(list(net.parameters()), "adamw", 1e-2, 0.1, CPU)
    train(net, optimizer, 2)
    saved = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in net.parameters()}
    init_optimizer_state(optimizer)
    for p in net.parameters():
        assert all(torch.equal(v, saved[id(p)][k]) for k, v in optimizer.state[p].items())


def test_an_optimizer_it_does_not_know_makes_its_states_lazily():
    net = model()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    init_optimizer_state(optimizer)
    assert not optimizer.state

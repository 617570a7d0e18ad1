"""Group-sparse training before removal (secateur.methods.group_sparsity): DepGraph's group-level sparse
learning (GroupSparsityPenalty) and GReg's growing regularisation (GrowingRegularization).

Every comparison is in float64 or a property with a wide margin; nothing depends on float32 summation order.
"""

from __future__ import annotations

import copy
import json
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import secateur
from secateur.errors import ConfigError, SecateurError
from secateur.graph import DependencyGraph
from secateur.methods import GroupSparsityPenalty, GrowingRegularization, unit_norms
from secateur.methods.group_sparsity import importance_scaling
from secateur.pruners.oneshot import remove_units
from secateur.train import Trainer
from secateur.zoo import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyCNN(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> mean pool -> linear: two prunable groups, ``c1.weight:0``
    (c1 rows, bn1, c2 columns) and ``c2.weight:0`` (c2 rows, bn2, fc columns)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 4)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``z``: c2's output, ``(N, 12, H, W)``."""
        return self.c2(F.relu(self.bn1(self.c1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn2(self.hidden(x))).mean((2, 3)))


def tiny(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    m = TinyCNN().double()
    with torch.no_grad():  # BatchNorm affine terms away from their (1, 0) init, so every member matters
        for bn in (m.bn1, m.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m


def data(n: int = 32, size: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, reg=None) -> None:
    """Own loop, plain SGD (no momentum, no weight decay), one ``reg.add_gradient(step)`` per step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if reg is not None:
            reg.add_gradient(step)
        opt.step()


def group_index(reg, name: str) -> int:
    return next(gi for gi in reg.group_ids if reg.graph.groups[gi].name == name)


# ------------------------------------------------------------------------------------------ the penalty
def test_unit_norms_read_every_parameter_member_of_the_unit():
    m = tiny()
    x, _ = data()
    reg = GroupSparsityPenalty(m, x[:2], 0.5)
    g = reg.graph.groups[group_index(reg, "c2.weight:0")]
    want = np.sqrt(
        m.c2.weight.detach().pow(2).sum((1, 2, 3)).numpy()
        + m.bn2.weight.detach().pow(2).numpy()
        + m.bn2.bias.detach().pow(2).numpy()
        + m.fc.weight.detach().pow(2).sum(0).numpy()
    )
    np.testing.assert_allclose(unit_norms(m, g), want, rtol=1e-13)
    np.testing.assert_allclose(reg.norms()["c2.weight:0"], want, rtol=1e-13)


@pytest.mark.parametrize(
    "make",
    [
        lambda m, x: GroupSparsityPenalty(m, x, 0.5, lam=0.3, power=1),
        lambda m, x: GroupSparsityPenalty(m, x, 0.5, lam=0.3, power=2),
        lambda m, x: GrowingRegularization(m, x, 0.5, delta=0.2, every=3),
    ],
    ids=["depgraph-lasso", "depgraph-squared", "greg"],
)
def test_gradient_edit_equals_the_gradient_of_the_loss_term(make):
    m = tiny()
    x, _ = data()
    reg = make(m, x[:2])
    m.zero_grad(set_to_none=True)
    reg.penalty(7).backward()
    autograd = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    reg.add_gradient(7)
    edited = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert (
        set(autograd)
        == set(edited)
        == {"c1.weight", "bn1.weight", "bn1.bias", "c2.weight", "bn2.weight", "bn2.bias", "fc.weight"}
    )  # fc.bias: outputs, in no group
    for n in autograd:
        torch.testing.assert_close(edited[n], autograd[n], rtol=1e-12, atol=1e-15)
    assert float(reg.penalty(7).detach()) > 0


def test_depgraph_penalty_is_eq7_with_eq8_scaling():
    m = tiny()
    x, _ = data()
    reg = GroupSparsityPenalty(m, x[:2], 0.5, lam=0.3, alpha=3.0, power=2)
    scores = reg.pruner.scores()
    want = 0.0
    for gi in reg.group_ids:
        g = reg.graph.groups[gi]
        s = scores[gi]
        gamma = 2.0 ** (3.0 * (s.max() - s) / (s.max() - s.min()))
        want += 0.3 * float((gamma * unit_norms(m, g) ** 2).sum())
    assert math.isclose(float(reg.penalty(0).detach()), want, rel_tol=1e-12)


def test_importance_scaling_spans_one_to_two_to_the_alpha():
    s = np.array([0.1, 0.5, 0.3, 0.9, 7.0])
    prunable = np.array([True, True, True, True, False])
    g = importance_scaling(s, prunable, 4.0)
    assert g[4] == 0.0  # not prunable: not penalised
    assert g[0] == 16.0 and g[3] == 1.0  # least important 2^alpha, most important 1
    assert g[0] > g[2] > g[1] > g[3]
    assert (importance_scaling(np.full(3, 2.0), np.ones(3, bool), 4.0) == 1.0).all()  # no spread: gamma 1


def test_group_lasso_gradient_is_zero_at_a_zero_unit_not_nan():
    m = tiny()
    x, _ = data()
    reg = GroupSparsityPenalty(m, x[:2], 0.5, lam=0.3, power=1, groups=["c2.weight:0"])
    with torch.no_grad():
        m.c2.weight[3].zero_()
        m.bn2.weight[3] = 0.0
        m.bn2.bias[3] = 0.0
        m.fc.weight[:, 3] = 0.0
    m.zero_grad(set_to_none=True)
    reg.penalty(0).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert float(m.bn2.weight.grad[3]) == 0.0 and float(m.c2.weight.grad[3].abs().sum()) == 0.0
    m.zero_grad(set_to_none=True)
    reg.add_gradient(0)
    assert float(m.bn2.weight.grad[3]) == 0.0 and float(m.c2.weight.grad[3].abs().sum()) == 0.0


# --------------------------------------------------------------------------------- (c) GReg's coefficient
def test_greg_coefficient_grows_by_delta_every_k_steps_up_to_the_ceiling():
    m = tiny()
    x, _ = data()
    # one group, so that c2.weight's rows get this group's penalty only (its columns belong to c1's group)
    reg = GrowingRegularization(m, x[:2], 0.5, delta=0.25, every=4, ceiling=1.0, groups=["c2.weight:0"])
    got = [reg.coefficient(t) for t in range(40)]
    assert got[:4] == [0.25] * 4 and got[4:8] == [0.5] * 4 and got[8:12] == [0.75] * 4
    assert got == [min(0.25 * (1 + t // 4), 1.0) for t in range(40)]
    assert max(got) == 1.0 and got[12:] == [1.0] * 28
    # the gradient edit adds exactly lambda_t * w on the chosen units' slices, nothing elsewhere
    gi = group_index(reg, "c2.weight:0")
    chosen = reg.chosen[gi]
    kept = np.setdiff1d(np.arange(12), chosen)
    assert chosen.size == 6
    for t in (0, 5, 9, 30):
        m.zero_grad(set_to_none=True)
        reg.on_after_backward(types.SimpleNamespace(global_step=t))  # the Trainer hook: at global_step
        lam = reg.coefficient(t)
        assert torch.equal(m.bn2.weight.grad[chosen], lam * m.bn2.weight.detach()[chosen])
        assert torch.equal(m.c2.weight.grad[chosen], lam * m.c2.weight.detach()[chosen])
        assert torch.equal(m.fc.weight.grad[:, chosen], lam * m.fc.weight.detach()[:, chosen])
        assert float(m.bn2.weight.grad[kept].abs().sum()) == 0.0
        assert float(m.c2.weight.grad[kept].abs().sum()) == 0.0 and m.c1.weight.grad is None
        assert float(m.fc.weight.grad[:, kept].abs().sum()) == 0.0


# -------------------------------------------------------------------------------- (a) the chosen units shrink
def _resnet8() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("resnet8", width=0.5, stem_stride=2).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 1, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (16,), generator=g)
    return model, x, y


def test_depgraph_shrinks_the_least_important_units_through_the_trainer():
    """Trained with the penalty (Trainer callback, 30 steps), the units eq. 8 pushes hardest (gamma >= 8) lose
    > 98% of their norm, while without it they keep > 50%; the most important (gamma <= 1.5) keep > 15%, over
    30x more than the least important (they shrink too: eq. 7 weighs every unit, and a unit's consumer
    columns are also rows of the next group's units)."""
    runs = {}
    for with_penalty in (False, True):
        model, x, y = _resnet8()
        reg = GroupSparsityPenalty(model, x[:1], 0.5, lam=0.2, alpha=4.0, power=2)
        gamma = reg.refresh(0)
        before = reg.norms()
        Trainer(
            model,
            [(x, y)] * 30,
            epochs=1,
            lr=0.05,
            momentum=0.0,
            weight_decay=0.0,
            lr_schedule="constant",
            callbacks=[reg] if with_penalty else [],
            progress=False,
            log_every=0,
        ).fit()
        after = reg.norms()
        names = [reg.graph.groups[gi].name for gi in reg.group_ids]
        ratio = np.concatenate([after[n] / before[n] for n in names])
        runs[with_penalty] = (ratio, np.concatenate([gamma[gi] for gi in reg.group_ids]))
    ratio_off, g = runs[False]
    ratio_on, g_on = runs[True]
    np.testing.assert_array_equal(g, g_on)  # same start, same gamma
    low, high = g >= 8.0, g <= 1.5
    assert low.sum() >= 6 and high.sum() >= 6
    assert ratio_on[low].max() < 0.02
    assert ratio_off[low].min() > 0.5
    assert ratio_on[high].min() > 0.15
    assert ratio_on[high].min() > 30 * ratio_on[low].max()


def _kept_part(model: nn.Module, reg: GrowingRegularization) -> dict[str, np.ndarray]:
    """Unit norms over the entries that belong to no chosen unit (a chosen unit's rows are also columns of the
    units of the group it feeds)."""
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for gi, rm in reg.chosen.items():
            for m in reg.graph.groups[gi].members:
                if not m.is_buffer:
                    idx = torch.from_numpy(np.nonzero(np.isin(m.unit_of, rm))[0])
                    params[m.name].index_fill_(m.dim, idx, 0.0)
    return {reg.graph.groups[gi].name: unit_norms(twin, reg.graph.groups[gi]) for gi in reg.group_ids}


def test_greg_pushes_exactly_the_chosen_units_to_zero():
    """Own loop, one add_gradient per step, 40 steps: the chosen units' norms fall below 1% of their start
    (without the penalty: above 50%); the entries of the other units that no chosen unit shares end within
    10% of where the same run without the penalty leaves them."""
    runs = {}
    for with_penalty in (False, True):
        model, x, y = _resnet8()
        reg = GrowingRegularization(model, x[:1], 0.5, delta=0.5, every=2, ceiling=4.0)
        before = reg.norms()
        train_steps(model, x, y, 40, lr=0.05, reg=reg if with_penalty else None)
        runs[with_penalty] = (before, reg.norms(), _kept_part(model, reg), reg)
    before, off, off_kept, reg = runs[False]
    _, on, on_kept, reg_on = runs[True]
    assert {gi: rm.tolist() for gi, rm in reg.chosen.items()} == {
        gi: rm.tolist() for gi, rm in reg_on.chosen.items()
    }
    for gi in reg.group_ids:
        name = reg.graph.groups[gi].name
        rm = reg.chosen[gi]
        kept = np.setdiff1d(np.arange(reg.graph.groups[gi].n_units), rm)
        assert rm.size > 0 and kept.size > 0
        assert (on[name][rm] / before[name][rm]).max() < 0.01
        assert (off[name][rm] / before[name][rm]).min() > 0.5
        np.testing.assert_allclose(on_kept[name][kept], off_kept[name][kept], rtol=0.1)


# ----------------------------------------------------------------------------- (b) removal changes little
def _removal_bound(model: TinyCNN, x: torch.Tensor, units: np.ndarray) -> float:
    """Bound on ``max_n ||logits_n(before) - logits_n(after)||_2`` when the units of group ``c2.weight:0``
    are removed, from their norms ``e_k = ||w_{g,k}||_2`` (c2 row, bn2 scale and shift, fc column):

    removing unit k drops ``fc[:, k] * mean_pos relu(bn2_k(z_k))`` from the logits; ``|relu(u)| <= |u|``
    and ``|bn2_k(z)| <= |gamma_k| M_k + |beta_k|`` with ``M_k = max_{n,pos} |z_k - mu_k| / sqrt(var_k + eps)``
    over the inputs, and ``||fc[:, k]||, |gamma_k|, |beta_k| <= e_k``, so the change is at most
    ``sum_k e_k^2 (1 + M_k)``."""
    bn = model.bn2
    with torch.no_grad():
        z = model.hidden(x)
        dev = (z - bn.running_mean.view(1, -1, 1, 1)).abs() / torch.sqrt(bn.running_var + bn.eps).view(
            1, -1, 1, 1
        )
        big_m = dev.amax((0, 2, 3)).numpy()
    g_norm = np.sqrt(
        model.c2.weight.detach().pow(2).sum((1, 2, 3)).numpy()
        + bn.weight.detach().pow(2).numpy()
        + bn.bias.detach().pow(2).numpy()
        + model.fc.weight.detach().pow(2).sum(0).numpy()
    )
    return float((g_norm[units] ** 2 * (1.0 + big_m[units])).sum())


@pytest.mark.parametrize("kind", ["greg", "depgraph"])
def test_removing_the_shrunk_units_changes_outputs_less_than_the_norm_bound(kind):
    """After sparse training restricted to group ``c2.weight:0``, removing the units the method removes (GReg:
    its choice; DepGraph: the driver's L1 selection) through the driver changes every logit vector by at most
    ``sum_k ||w_{g,k}||^2 (1 + M_k)`` (:func:`_removal_bound`), which the training made < 1e-3 of the logits'
    size; the same removal from the untrained weights changes them > 100x that bound (float64)."""
    m = tiny()
    x, y = data()
    if kind == "greg":
        reg = GrowingRegularization(m, x[:2], 0.5, delta=0.5, every=4, ceiling=2.0, groups=["c2.weight:0"])
        steps = 60
    else:
        reg = GroupSparsityPenalty(m, x[:2], 0.5, lam=0.2, alpha=4.0, groups=["c2.weight:0"])
        steps = 40
    untrained = tiny()  # the same removal from the untrained weights, for contrast
    untrained.eval()
    train_steps(m, x, y, steps, lr=0.05, reg=reg)
    m.eval()
    with torch.no_grad():
        before = m(x)
        before_untrained = untrained(x)
    gi = group_index(reg, "c2.weight:0")
    units = reg.selection()[gi]
    assert units.size == 6
    norms = unit_norms(m, reg.graph.groups[gi])[units]
    bound = _removal_bound(m, x, units)
    bound_untrained = _removal_bound(untrained, x, units)
    reg.finalize()
    assert m.c2.out_channels == 6 and m.fc.in_features == 6
    assert reg.removed_norms == {"c2.weight:0": norms.tolist()}
    with torch.no_grad():
        change = float((m(x) - before).norm(dim=1).max())
        untrained_change = float((before_untrained - _without(untrained, units)(x)).norm(dim=1).max())
    assert max(norms) < 0.01  # shrunk: the units removed are near zero, not exactly zero
    assert change <= bound + 1e-12  # 1e-12: float64 rounding of O(1) logits
    assert bound < 1e-3 * float(before.norm(dim=1).mean())  # the penalty made the removal nearly free
    # the same removal from the untrained weights changes the outputs a lot (within its own, larger bound)
    assert untrained_change <= bound_untrained + 1e-12
    assert untrained_change > 100 * bound


def _without(model: TinyCNN, units: np.ndarray) -> TinyCNN:
    """``model`` with the units of group ``c2.weight:0`` removed by the driver (a copy)."""
    twin = copy.deepcopy(model)
    x, _ = data()
    graph = DependencyGraph.build(twin, x[:2])
    gi = next(i for i, g in enumerate(graph.groups) if g.name == "c2.weight:0")
    remove_units(twin, graph, {gi: units}, x[:2], verify=True)
    return twin


# -------------------------------------------------------------------- any criterion, the driver's removal
@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "bn_scale", "taylor", "fisher", "random"])
def test_any_group_criterion_trains_and_ends_in_the_driver(criterion):
    m = tiny()
    x, y = data()
    reg = GroupSparsityPenalty(m, x[:2], 0.5, lam=0.05, criterion=criterion, data=[(x, y)])
    Trainer(m, [(x, y)] * 3, epochs=1, lr=0.01, callbacks=[reg], progress=False, log_every=0).fit()
    assert set(reg.gamma) == set(reg.group_ids)
    _, plan = reg.finalize()
    assert m.c1.out_channels == 4 and m.c2.out_channels == 6  # uniform: half of each group
    assert (
        plan["tensors"]["c2.weight"]["0"]
        == np.setdiff1d(np.arange(12), reg.removed_units["c2.weight:0"]).tolist()
    )
    with pytest.raises(ConfigError, match="already finalized"):
        reg.finalize()


def test_greg_removes_exactly_the_units_it_chose_first():
    m = tiny()
    x, y = data()
    reg = GrowingRegularization(m, x[:2], 0.25, criterion="l1", allocation="global", target="macs")
    chosen = {reg.graph.groups[gi].name: rm.tolist() for gi, rm in reg.chosen.items()}
    assert chosen
    train_steps(m, x, y, 3, lr=0.01, reg=reg)
    keep_out = np.setdiff1d(np.arange(12), chosen.get("c2.weight:0", []))
    keep_in = np.setdiff1d(np.arange(8), chosen.get("c1.weight:0", []))
    trained_c2 = m.c2.weight.detach().clone()
    reg.finalize()
    assert reg.removed_units == chosen
    assert torch.equal(m.c2.weight.detach(), trained_c2[keep_out][:, keep_in])


def test_state_round_trips_through_json():
    m = tiny()
    x, y = data()
    reg = GrowingRegularization(m, x[:2], 0.5)
    dep = GroupSparsityPenalty(m, x[:2], 0.5)
    dep.add_gradient(0)
    for r, cls, kw in ((reg, GrowingRegularization, {}), (dep, GroupSparsityPenalty, {})):
        state = json.loads(json.dumps(r.state_dict()))
        fresh = cls(tiny(1), x[:2], 0.5, **kw)
        fresh.load_state_dict(state)
        assert fresh.state_dict() == r.state_dict()
        with pytest.raises(ConfigError, match="conv9"):
            fresh.load_state_dict({"chosen": {"conv9.weight:0": [0]}, "gamma": {"conv9.weight:0": [1.0]}})


# ------------------------------------------------------------------------------------ (d) bad arguments
BAD = [
    (GroupSparsityPenalty, {"lam": -1e-3}, "lam"),
    (GroupSparsityPenalty, {"lam": float("nan")}, "lam"),
    (GroupSparsityPenalty, {"alpha": -1.0}, "alpha"),
    (GroupSparsityPenalty, {"power": 3}, "power"),
    (GroupSparsityPenalty, {"update_every": 0}, "update_every"),
    (GroupSparsityPenalty, {"criterion": "l7"}, "l7"),
    (GroupSparsityPenalty, {"groups": ["c2.weigth:0"]}, "c2.weigth:0"),
    (GroupSparsityPenalty, {"sparsity": 1.0}, "sparsity"),
    (GrowingRegularization, {"delta": 0.0}, "delta"),
    (GrowingRegularization, {"delta": 0.5, "ceiling": 0.1}, "ceiling"),
    (GrowingRegularization, {"every": 0}, "every"),
    (GrowingRegularization, {"power": 1}, "power"),
    (GrowingRegularization, {"criterion": "taylr"}, "taylr"),
    (GrowingRegularization, {"groups": ["fc.weight:1"]}, "fc.weight:1"),
    (GrowingRegularization, {"sparsity": 0.01}, "selects no unit"),
]


@pytest.mark.parametrize(("cls", "kwargs", "named"), BAD, ids=[f"{c.__name__}-{n}" for c, _, n in BAD])
def test_bad_arguments_raise_named_errors_and_leave_the_model_untouched(cls, kwargs, named):
    m = tiny()
    x, _ = data()
    kwargs = dict(kwargs)
    sparsity = kwargs.pop("sparsity", 0.5)
    before = snapshot(m)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as err:
        cls(m, x[:2], sparsity, **kwargs)
    assert isinstance(err.value, SecateurError)
    assert same_state(m, before)
    assert not any(parametrize.is_parametrized(mod) for mod in m.modules())
    assert not any(mod._forward_hooks or mod._backward_hooks or mod._forward_pre_hooks for mod in m.modules())
    assert all(p.grad is None for p in m.parameters())


def test_unknown_criterion_and_group_messages_suggest_the_closest_names():
    m = tiny()
    x, _ = data()
    with pytest.raises(ConfigError, match="did you mean 'taylor'"):
        GroupSparsityPenalty(m, x[:2], 0.5, criterion="taylr")
    with pytest.raises(ConfigError, match="did you mean 'c2.weight:0'"):
        GroupSparsityPenalty(m, x[:2], 0.5, groups=["c2.weigth:0"])


def test_public_names():
    assert secateur.GroupSparsityPenalty is GroupSparsityPenalty
    assert secateur.GrowingRegularization is GrowingRegularization

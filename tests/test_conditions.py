"""Extra per-row conditions (Batch.cond, e.g. augmentation labels) reach every network call on the right rows.

A toy backbone declares the condition `aux` and checks, in every call, that each row's `aux` equals that row's
class label (the batch is built with aux = y): any objective that slices, concatenates or reorders rows for its
guidance, teacher or JVP calls without carrying `cond` along the same way fails the check.
"""
import pytest
import torch

from conftest import builtin
from fewstep.interfaces import Batch, BuildContext, DataSpec

NUM_CLASSES = 50
CTX = BuildContext(data=DataSpec((2, 4, 4), NUM_CLASSES, cond_shapes={"aux": ()}), train_steps=100)


class AuxNet(torch.nn.Module):
    conditions = ("aux",)

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(32 + 3, 32)
        self.calls = 0
        self.checked = 0

    def forward(self, x, t, s, y=None, aux=None):
        assert aux is not None and aux.shape == (x.shape[0],), "every call gets the condition, one value per row"
        self.calls += 1
        if y is not None:
            real = y != NUM_CLASSES  # null-class rows (dropped labels, unconditional guidance) carry no label to check
            assert torch.equal(aux[real], y[real].to(aux.dtype)), "a row got another row's condition"
            self.checked += int(real.sum())
        h = torch.cat([x.flatten(1), t[:, None], s[:, None], aux[:, None] / NUM_CLASSES], 1)
        return self.lin(h).view_as(x)


def batch(b=16):
    g = torch.Generator().manual_seed(0)
    y = torch.randperm(NUM_CLASSES, generator=g)[:b]
    return Batch(torch.randn(b, 2, 4, 4, generator=g), y, {"aux": y.float()})


@pytest.mark.parametrize("name,opts", [
    ("fm", {}),
    ("soflow", {}),  # training-time CFG on: guidance rows v_u (null) and v_c (labels), teacher rows
    ("soflow", {"cfg_scale": 1.0, "cfg_drop": 0.0, "fm_ratio": 0.25}),
    ("meanflow", {"jvp_mode": "lean", "jvp_impl": "torch", "omega": 1.0, "kappa": 0.5}),
    ("meanflow", {"jvp_mode": "single", "jvp_impl": "torch"}),
    ("meanflow", {"jvp_mode": "lean", "jvp_impl": "torch", "reuse_u_for_cfg": False, "drop_rows": "random"}),
    ("ect", {}),
    ("imf", {"tangent": "boundary", "jvp_impl": "torch"}),  # guidance rows (v_c at the gate, v_u null), JVP rows
    ("imf", {"tangent": "boundary", "drop_rows": "random", "tangent_label": "input"}),
    ("sct", {}),  # the JVP forward and the gradient forward
])
def test_every_network_call_gets_its_rows_conditions(name, opts):
    torch.manual_seed(0)
    net = AuxNet()
    obj = builtin("objective", name)(CTX, **opts)
    obj.extend(net)  # as build_components does (sct adds its weighting head)
    out = obj.loss(net, batch(), step=5)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert net.calls >= (2 if name != "fm" else 1) and net.checked >= 8
    assert net.lin.weight.grad is not None and net.lin.weight.grad.abs().sum() > 0


def test_data_conditions_the_backbone_does_not_take_are_a_named_error(monkeypatch):
    from fewstep.build import BuildError, build_components, check_components
    from fewstep.recipe import recipe_from_dict
    from fewstep_plugins.digits import data as digits_data

    from conftest import tiny_dict

    orig = digits_data.Digits.__init__

    def with_aux(self, *a, **kw):
        orig(self, *a, **kw)
        self.spec = DataSpec(self.spec.shape, self.spec.num_classes, self.spec.name, cond_shapes={"augment_labels": (6,)})

    monkeypatch.setattr(digits_data.Digits, "__init__", with_aux)
    r = recipe_from_dict(tiny_dict())
    for fn in (check_components, lambda rec: build_components(rec)):
        with pytest.raises(BuildError, match="augment_labels.*'dit' does not take"):
            fn(r)

"""The loop at hardware speed: no host synchronisation between the steps that log, the fused EMA update equals
the per-parameter formula, the prefetcher hands over the source's own batches, and a seeded run gives the numbers
of the loop that read every step's loss on the host (written out below as the reference)."""
from __future__ import annotations

import contextlib
import json
import random
import threading

import pytest
import torch

import fewstep
from fewstep.build import build_components
from fewstep.data import TensorSource
from fewstep.engine import checkpoint as ckpt
from fewstep.engine.distributed import init_distributed
from fewstep.engine.ema import EMA
from fewstep.engine.prefetch import Prefetcher
from fewstep.engine.trainer import Trainer, TrainingDiverged, make_optimizer
from fewstep.interfaces import LossOutput
from fewstep.recipe import recipe_from_dict
from safetensors.torch import load_file

from conftest import tiny_dict

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class Probe:
    """An in-process objective: fm that records the step it is in and turns the loss into NaN at chosen steps."""

    __name__ = "probe"
    step = None
    nan_at: set = set()

    @fewstep.hookimpl
    def register_objectives(register):
        def build(ctx, **opts):
            from fewstep_plugins.fm.objective import FlowMatching

            class Obj(FlowMatching):
                def loss(self, net, batch, step):
                    Probe.step = step
                    out = super().loss(net, batch, step)
                    if step in Probe.nan_at:
                        return LossOutput(out.loss * float("nan"), out.metrics)
                    return out

            return Obj(ctx, **opts)

        from fewstep_plugins.fm import FM_OPTIONS

        register("fm-probe", build, default_sampler="ode", options=FM_OPTIONS)


@contextlib.contextmanager
def count_host_reads(monkeypatch):
    """Every call of a Tensor method that reads a value on the host, made by the main thread after the first loss:
    (0-based step of the last loss, method, where)."""
    calls = []
    main = threading.main_thread()
    for name in SYNCS:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            if threading.current_thread() is main and Probe.step is not None:
                import traceback

                where = traceback.extract_stack(limit=3)[0]
                calls.append((Probe.step, _name, f"{where.filename}:{where.lineno}"))
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    Probe.step = None
    yield calls
    Probe.step = None


def probe_recipe(**train):
    return recipe_from_dict(tiny_dict(objective={"name": "fm-probe"},
                                      train={"steps": 12, "log_every": 4, "checkpoint_every": 0, **train}))


def test_no_host_read_between_the_steps_that_log(tmp_path, registry, monkeypatch):
    registry.register_plugin(Probe, name="probe")
    Probe.nan_at = {5}  # a skipped step in the middle of a window is no reason to read anything early
    with count_host_reads(monkeypatch) as calls:
        res = Trainer(probe_recipe(), tmp_path / "run", show_progress=False, final_grids=False).run()
    assert res.skipped_steps == 1 and res.step == 12
    # the loss of 0-based step k ends finished step k + 1; the host reads only after steps 4, 8 and 12
    assert calls, "the logged steps read their window (the counter works)"
    assert {k + 1 for k, _, _ in calls} <= {4, 8, 12}, sorted({c for c in calls if c[0] + 1 not in (4, 8, 12)})


def test_an_optimizer_without_a_device_side_skip_reads_every_step(tmp_path, registry, monkeypatch):
    """The counter above has teeth: RAdam has no fused kernel, so the loop reads the finite flag every step."""
    registry.register_plugin(Probe, name="probe")
    Probe.nan_at = set()
    with count_host_reads(monkeypatch) as calls:
        Trainer(probe_recipe(optimizer="radam"), tmp_path / "run", show_progress=False, final_grids=False).run()
    assert {k + 1 for k, _, _ in calls} >= set(range(1, 13))


def test_checkpoint_and_sample_steps_read_the_window_first(tmp_path, registry):
    """A run of bad steps ending on a checkpoint step: no checkpoint then (as before), and the divergence is found
    at the next step that reads the window, naming the step the run of bad steps reached max_bad_steps."""
    registry.register_plugin(Probe, name="probe")
    Probe.nan_at = {4, 5, 6}  # finished steps 5, 6, 7
    r = probe_recipe(max_bad_steps=3, checkpoint_every=3, log_every=100, steps=20)
    with pytest.raises(TrainingDiverged) as exc:
        Trainer(r, tmp_path / "run", show_progress=False, final_grids=False).run()
    msg = str(exc.value)
    assert "3 non-finite steps in a row, the last at step 7" in msg and "step_00000003" in msg
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")] == ["step_00000003"]


# -- the reference: the loop as it was, reading every step on the host ----------------------------------------
def old_ema_update(shadows, decays, every, state, step):
    """fewstep's EMA before the foreach update, parameter by parameter."""
    if step % every:
        return
    for decay, shadow in zip(decays, shadows):
        d = decay ** every
        for k, v in state.items():
            s = shadow[k]
            if not v.dtype.is_floating_point:
                s.copy_(v)
            elif every == 1:
                s.mul_(d).add_(v.detach().float(), alpha=1.0 - d)
            else:
                s.copy_(d * s.double() + (1.0 - d) * v.detach().double())


def old_loop(recipe):
    tr = recipe.train
    info = init_distributed("cpu")
    comps = build_components(recipe, device=torch.device("cpu"))
    net, objective, data = comps.net, comps.objective, comps.data
    objective.prepare(net)
    opt = make_optimizer([p for p in net.parameters() if p.requires_grad], tr, torch.device("cpu"))
    shadows = [{k: v.detach().clone().float() for k, v in net.state_dict().items()} for _ in tr["ema"]]
    torch.manual_seed(info.rank_seed(tr["seed"]))
    random.seed(info.rank_seed(tr["seed"]))
    batches = data.batches(tr["batch"], seed=tr["seed"], start_step=0)
    params = [p for p in net.parameters() if p.requires_grad]
    step, skipped, window, window_n, logged = 0, 0, {}, 0, []
    while step < tr["steps"]:
        b = next(batches)
        out = objective.loss(net, b, step)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        finite = bool(torch.isfinite(out.loss.detach()) & torch.isfinite(grad_norm))
        if not finite:
            opt.zero_grad(set_to_none=True)
            step += 1
            skipped += 1
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            old_ema_update(shadows, tr["ema"], tr["ema_every"], net.state_dict(), step)
            window_n += 1
            for k, v in {"loss": out.loss.detach(), "grad_norm": grad_norm, **out.metrics}.items():
                window[k] = window.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
        if step % tr["log_every"] == 0 or step == tr["steps"]:
            logged.append({k: float(v) / window_n for k, v in window.items()} if window_n else {})
            window, window_n = {}, 0
    ema = {f"ema{i}.{k}": v for i, sh in enumerate(shadows) for k, v in sh.items()}
    return net.state_dict(), ema, logged, skipped


@pytest.mark.parametrize("train", [{"ema": [0.9, 0.5]}, {"ema": [0.999], "ema_every": 2}],
                         ids=["ema-float32", "ema-every-2-float64"])
def test_a_seeded_run_gives_the_numbers_of_the_loop_that_read_every_step(tmp_path, registry, train):
    registry.register_plugin(Probe, name="probe")
    Probe.nan_at = {1, 6}  # finished steps 2 and 7: one an EMA step of ema_every = 2, one not
    r = probe_recipe(**train)
    res = Trainer(r, tmp_path / "run", show_progress=False, final_grids=False).run()
    model, ema, logged, skipped = old_loop(r)
    assert res.skipped_steps == skipped == 2
    latest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    got_model, got_ema = load_file(latest / "model.safetensors"), load_file(latest / "ema.safetensors")
    for k, v in model.items():
        assert torch.equal(got_model[k], v), k
    assert got_ema.keys() == ema.keys()
    for k, v in ema.items():
        assert torch.equal(got_ema[k], v), k
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(logged) == 3
    for line, ref in zip(lines, logged):
        assert ref and {k: line[k] for k in ref} == ref  # the same float64 numbers, not merely close


# -- EMA: foreach against the per-parameter formula --------------------------------------------------------------
class WithBuffers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(37, 19)
        self.b = torch.nn.Conv2d(3, 5, 3)
        self.register_buffer("count", torch.tensor(0, dtype=torch.long))
        self.register_buffer("scale", torch.ones(7))


def perturb(net, gen):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))
        net.count += 1
        net.scale.mul_(1.001)


@pytest.mark.parametrize("decays,every", [([0.9, 0.5], 1), ([0.9999], 1), ([0.999, 0.99993], 1),
                                          ([0.9999], 16), ([0.9, 0.9999], 3)])
def test_ema_foreach_equals_the_per_parameter_formula_bit_for_bit(decays, every):
    torch.manual_seed(0)
    net = WithBuffers()
    ema = EMA(net, decays, every)
    ref = [{k: v.detach().clone().float() for k, v in net.state_dict().items()} for _ in decays]
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 3 * every * 8 + 1):
        perturb(net, gen)
        ema.update(net, step)
        old_ema_update(ref, decays, every, net.state_dict(), step)
    for sh, rf in zip(ema.shadows, ref):
        for k in rf:
            assert torch.equal(sh[k], rf[k]), k
    assert ema.shadows[0]["count"].item() == 3 * every * 8


@pytest.mark.parametrize("every", [1, 4])
def test_ema_with_a_device_flag_updates_when_true_and_keeps_every_bit_when_false(every):
    torch.manual_seed(0)
    net = WithBuffers()
    masked, plain = EMA(net, [0.99, 0.9], every), EMA(net, [0.99, 0.9], every)
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 4 * every + 1):
        perturb(net, gen)
        masked.update(net, step, ok=torch.tensor(True))
        plain.update(net, step)
    before = [{k: v.clone() for k, v in sh.items()} for sh in masked.shadows]
    for a, b in zip(masked.shadows, plain.shadows):
        assert all(torch.equal(a[k], b[k]) for k in a)
    perturb(net, gen)
    masked.update(net, 4 * every, ok=torch.tensor(False))  # a skipped step: nothing moves, buffers included
    for a, b in zip(masked.shadows, before):
        assert all(torch.equal(a[k], b[k]) for k in a)


# -- the prefetcher and in-memory data on the device --------------------------------------------------------------
def test_prefetcher_hands_over_the_sources_batches_in_order_and_raises_where_the_source_did():
    g = torch.Generator().manual_seed(0)
    src = TensorSource(torch.randn(50, 1, 4, 4, generator=g), torch.arange(50), 50, "t")
    direct = src.batches(8, seed=5, start_step=3)
    pre = Prefetcher(src.batches(8, seed=5, start_step=3), "cpu", depth=3)
    for _ in range(20):  # several epochs of 50 rows
        a, b = next(direct), next(pre)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    pre.close()
    assert not pre._thread.is_alive()

    def failing():
        yield next(direct)
        yield next(direct)
        raise fewstep.api.DataError("the source broke at its third batch")

    pre = Prefetcher(failing(), "cpu")
    next(pre), next(pre)
    with pytest.raises(fewstep.api.DataError, match="third batch"):
        next(pre)
    pre.close()


def test_the_first_batch_is_made_on_the_calling_thread():
    """A source's start-up (a DataLoader drawing its seed from the global RNG) happens where it did before."""
    threads = []

    def source():
        while True:
            threads.append(threading.current_thread())
            yield fewstep.api.Batch(torch.zeros(2, 1), None)

    pre = Prefetcher(source(), "cpu")
    next(pre), next(pre)
    pre.close()
    assert threads[0] is threading.current_thread() and threads[1] is not threading.current_thread()


def test_an_in_memory_data_set_moves_to_the_device_only_when_it_fits_a_quarter_of_the_free_memory():
    x = torch.zeros(100, 3, 8, 8)  # 76.8 kB with the labels
    src = TensorSource(x, torch.zeros(100, dtype=torch.long), 10, "t")
    need = x.nbytes + 100 * 8
    assert src.place("cpu") == ""  # CPU training: nothing to move
    note = src.place("cuda:0", free_bytes=4 * need - 1)
    assert "stay in host memory" in note and src._on_device is None
    if torch.cuda.is_available():
        assert "held on" in src.place("cuda:0", free_bytes=4 * need)
        a = next(TensorSource(x, torch.zeros(100, dtype=torch.long), 10, "t").batches(8, seed=1))
        b = next(src.batches(8, seed=1))
        assert b.x.device.type == "cuda" and torch.equal(a.x, b.x.cpu()) and torch.equal(a.y, b.y.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
def test_on_cuda_no_step_between_logs_synchronises(tmp_path, registry):
    """On a GPU every synchronisation is seen, C++ ones included: sync debug mode 'error' from the loss of a step
    that does not read the window until the next loss."""
    class Guard:
        __name__ = "guard"

        @fewstep.hookimpl
        def register_objectives(register):
            def build(ctx, **opts):
                from fewstep_plugins.fm.objective import FlowMatching

                class Obj(FlowMatching):
                    def loss(self, net, batch, step):
                        torch.cuda.set_sync_debug_mode("default" if (step + 1) % 4 == 0 else "error")
                        return super().loss(net, batch, step)

                return Obj(ctx, **opts)

            from fewstep_plugins.fm import FM_OPTIONS

            register("fm-guard", build, default_sampler="ode", options=FM_OPTIONS)

    registry.register_plugin(Guard, name="guard")
    r = recipe_from_dict(tiny_dict(objective={"name": "fm-guard"},
                                   train={"steps": 12, "log_every": 4, "checkpoint_every": 0, "device": "cuda"}))
    try:
        Trainer(r, tmp_path / "run", show_progress=False, final_grids=False).run()
    finally:
        torch.cuda.set_sync_debug_mode("default")

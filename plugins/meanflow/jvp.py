"""The JVP behind MeanFlow's target (official meanflow.py:224-236): u and du/dt = d/dt u(z_t, t, r) along (v_g, 1, 0).

Two modes (option `jvp_mode`):
  single: one torch.func.jvp call returns (u, du/dt); u keeps its graph (py-meanflow's recipe).
          Needs the unwrapped module, so DDP must be replaced by a manual all-reduce.
  lean:   du/dt from a no-grad JVP on the r != t rows only, then u from an ordinary forward on all
          rows (py-meanflow README's "without compile" recipe): memory near a plain step. Dropout
          masks are shared by restoring the CPU (and CUDA) RNG state between the two passes; a
          stochastic backbone gets its JVP on all rows so the masks line up row for row.
Two implementations (option `jvp_impl`): torch.func.jvp, or the backbone's own hand-written
`forward_jvp` (the DiT has one: plugins/dit/jvp.py), which needs no forward-mode AD and keeps the fused
attention kernel for the primal. Fused SDPA kernels have no forward-mode AD (pytorch #128971):
torch.func.jvp runs attention under the math backend.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Callable

import torch
from torch import nn


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module under DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        if isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            net = net.module
        elif isinstance(getattr(net, "_orig_mod", None), nn.Module):
            net = net._orig_mod
        else:
            return net


def strip_ddp(net: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel wrappers, keeping a torch.compile wrapper (for no-grad forwards)."""
    while isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        net = net.module
    return net


@contextlib.contextmanager
def math_attention(module: nn.Module):
    """Route attention through forward-AD-capable math: SDPA's MATH backend, plus timm's `fused_attn` switch
    (explicit softmax) as a fallback for torch builds without torch.nn.attention.sdpa_kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        sdpa_kernel = None
    if sdpa_kernel is not None:
        with sdpa_kernel(SDPBackend.MATH):
            yield
        return
    flagged = [m for m in module.modules() if getattr(m, "fused_attn", False) is True]
    for m in flagged:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in flagged:
            m.fused_attn = True


def get_rng(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def is_stochastic(module: nn.Module) -> bool:
    """Training-mode dropout (or drop-path) with p > 0 anywhere in the module."""
    if not module.training:
        return False
    return any((isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0) or (getattr(m, "drop_prob", 0) or 0) > 0
               for m in module.modules())


def _jvp(fn: Callable, z, t, r, v_g, fp32: bool = False):
    """(u, du/dt) of fn(z, t, r) along tangents (v_g, 1, 0).

    fp32=True switches autocast off inside the JVP (py-meanflow); False keeps the step's precision
    (bf16 autocast in bf16 runs). In fp32 runs, the paper's setting, the two are the same.
    """
    ctx = torch.autocast(z.device.type, enabled=False) if fp32 else contextlib.nullcontext()
    with ctx:
        return torch.func.jvp(fn, (z, t, r), (v_g, torch.ones_like(t), torch.zeros_like(r)))


def use_backbone_jvp(core: nn.Module, impl: str) -> bool:
    """Whether du/dt comes from the backbone's own `forward_jvp` (impl 'auto' when it has one and is deterministic)."""
    if impl not in ("auto", "backbone", "torch"):
        raise ValueError(f"jvp_impl must be 'auto', 'backbone' or 'torch', got {impl!r}")
    has = callable(getattr(core, "forward_jvp", None))
    if impl == "backbone":
        if not has:
            raise ValueError(f"jvp_impl = 'backbone' but {type(core).__name__} has no forward_jvp method; "
                             "use jvp_impl = 'auto' or 'torch' (torch.func.jvp)")
        if is_stochastic(core):
            raise ValueError("jvp_impl = 'backbone' needs a deterministic backbone (dropout is active); use 'auto' "
                             "or 'torch', whose JVP replays the dropout masks")
        return True
    return impl == "auto" and has and not is_stochastic(core)


class _CompiledJVP:
    """torch.compile(type(core).forward_jvp), called as fn(core, *args). Under jvp_compile = 'auto' a backend
    that cannot compile (no Triton, no C++ compiler) is reported once and the eager function is used instead;
    under 'on' its error propagates."""

    def __init__(self, fn: Callable, strict: bool):
        self.fn, self.compiled, self.strict, self.failed = fn, torch.compile(fn), strict, False

    def __call__(self, core: nn.Module, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(core, *args, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as exc:
                if self.strict:
                    raise
                self.failed = True
                inner = getattr(exc, "inner_exception", None) or exc
                first = f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0]}"
                warnings.warn(f"jvp_compile = 'auto': torch.compile of {type(core).__name__}.forward_jvp failed "
                              f"({first[:200]}); running it eagerly (same values, slower). Set jvp_compile = 'off' "
                              "to skip compiling, or 'on' to make this an error.", RuntimeWarning, stacklevel=2)
        return self.fn(core, *args, **kwargs)


_COMPILED: "weakref.WeakKeyDictionary[nn.Module, _CompiledJVP]" = weakref.WeakKeyDictionary()


def backbone_jvp(core: nn.Module, compile: str, device: torch.device) -> Callable:
    """core.forward_jvp, or its torch.compile'd version (compile 'on', or 'auto' on CUDA): plain tensor ops, no
    forward-mode AD, so inductor can fuse the tangent's elementwise work into few kernels. Compiled once per
    module (the function of its class, called with the module as first argument; dynamo guards the rest)."""
    if compile not in ("auto", "on", "off"):
        raise ValueError(f"jvp_compile must be 'auto', 'on' or 'off', got {compile!r}")
    if compile == "off" or (compile == "auto" and device.type != "cuda"):
        return core.forward_jvp
    compiled = _COMPILED.get(core)
    if compiled is None:
        compiled = _COMPILED[core] = _CompiledJVP(type(core).forward_jvp, strict=compile == "on")
    return lambda *args, **kwargs: compiled(core, *args, **kwargs)


def u_and_dudt(net: nn.Module, z, t, r, y, v_g, mode: str = "lean", fp32: bool = False, impl: str = "auto",
               compile: str = "off", cond: dict | None = None):
    """u = net(z, t, r, y) with gradient, and du/dt (no gradient) along (v_g, 1, 0).

    `net` may be DDP-wrapped: the JVP always calls the unwrapped module; in lean mode the
    ordinary forward for u goes through `net` itself so that DDP synchronises gradients.
    impl: 'torch' = torch.func.jvp (attention on the math path); 'backbone' = the backbone's hand-written
    `forward_jvp(x, t, s, y, dx, dt, ds)` (DiT: plugins/dit/jvp.py, exact, no forward-mode AD); 'auto' = the
    backbone's when it has one and is deterministic, else torch.func.jvp. compile: torch.compile the
    backbone's forward_jvp ('auto': on CUDA only; torch.func.jvp itself does not compile on torch 2.11).
    """
    if mode not in ("lean", "single"):
        raise ValueError(f"jvp_mode must be 'lean' or 'single', got {mode!r}")
    cond = cond or {}  # extra per-row conditions (augmentation labels): inputs of the network, not JVP variables
    core = unwrap(net)
    hand = use_backbone_jvp(core, impl)
    if mode == "single":
        if hand:
            with (torch.autocast(z.device.type, enabled=False) if fp32 else contextlib.nullcontext()):
                u, dudt = backbone_jvp(core, compile, z.device)(z, t, r, y, v_g, torch.ones_like(t), torch.zeros_like(r),
                                                                **cond)
            return u, dudt.detach()
        with math_attention(core):
            # always full precision: under bf16 autocast, backward through the forward-AD graph fails
            # ("expected input and grad types to match"; torch 2.11, H200), and py-meanflow runs it in fp32
            u, dudt = _jvp(lambda z_, t_, r_: core(z_, t_, r_, y, **cond), z, t, r, v_g, fp32=True)
        return u, dudt.detach()
    stochastic = is_stochastic(core)
    rows = None if stochastic else (t != r).nonzero().squeeze(1)  # h = 0 rows need no du/dt (clip(h) = 0)
    state = get_rng(z.device)
    dudt = torch.zeros_like(z)
    if rows is None or rows.numel() > 0:
        pick = (lambda a: a) if rows is None else (lambda a: None if a is None else a.index_select(0, rows))
        y_sub = pick(y)
        c_sub = {k: pick(c) for k, c in cond.items()}
        if hand:
            with torch.no_grad(), (torch.autocast(z.device.type, enabled=False) if fp32 else contextlib.nullcontext()):
                t_sub, r_sub = pick(t), pick(r)
                _, d = backbone_jvp(core, compile, z.device)(pick(z), t_sub, r_sub, y_sub, pick(v_g),
                                                             torch.ones_like(t_sub), torch.zeros_like(r_sub), **c_sub)
        else:
            with torch.no_grad(), math_attention(core):
                _, d = _jvp(lambda z_, t_, r_: core(z_, t_, r_, y_sub, **c_sub), pick(z), pick(t), pick(r), pick(v_g), fp32)
        if rows is None:
            dudt = d
        else:
            dudt = dudt.index_copy(0, rows, d.to(dudt.dtype))
    set_rng(state, z.device)  # the forward below draws the dropout masks the JVP drew
    with (math_attention(core) if stochastic else contextlib.nullcontext()):  # same kernel -> same attention-dropout masks
        u = net(z, t, r, y, **cond)
    return u, dudt

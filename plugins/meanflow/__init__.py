"""MeanFlow: average-velocity objective with a JVP target, and its sampler.

Defaults are the official ImageNet values (Gsunshine/meanflow configs/default.py:51-71; docs/objectives/meanflow.md):
P_mean -0.4, P_std 1.0, data_proportion 0.75 (first rows by index), p 1.0, eps 0.01,
omega 1.0, kappa 0.5, CFG interval [0, 1], class dropout 0.1 (first rows by index).
CIFAR-10 (py-meanflow meanflow/train_arg_parser.py): fm_share 0.25 with fm_rows 'random', p 0.75, eps 0.001, no CFG
(unconditional), and time sampler v0 = sorted (-2, 2) / (-2, 2) or v1 = min (-0.6, 1.6) / (-4, 1.6).
"""
from fewstep.api import Option, hookimpl

OPTIONS = [
    # (t, r) sampling (official meanflow.py:147-157 sample_tr / py-meanflow time_sampler.py)
    Option("time_sampler", str, "sorted",
           "sorted: t, r drawn independently, then t = max, r = min (official sample_tr; py-meanflow v0); "
           "min: r = min(t, r) without swapping (py-meanflow v1)", choices=("sorted", "min")),
    Option("t_mean", float, -0.4, "t ~ sigmoid(N(t_mean, t_std)) before sorting (P_mean; CIFAR v0 -2.0, v1 -0.6)"),
    Option("t_std", float, 1.0, "logit-normal std of t (P_std; CIFAR v0 2.0, v1 1.6)", gt=0),
    Option("r_mean", float, -0.4, "r ~ sigmoid(N(r_mean, r_std)) before sorting (= P_mean officially; CIFAR v0 -2.0, v1 -4.0)"),
    Option("r_std", float, 1.0, "logit-normal std of r (= P_std officially; CIFAR v0 2.0, v1 1.6)", gt=0),
    Option("fm_share", float, 0.75, "share of rows with r = t (plain FM rows) (data_proportion 0.75; CIFAR: 1 - ratio = 0.25)",
           ge=0, le=1),
    Option("fm_rows", str, "first", "which rows get r = t: the first int(fm_share B) by index (official JAX) or a "
           "Bernoulli(fm_share) mask (py-meanflow, PyTorch ports)", choices=("first", "random")),
    # adaptive weighting (meanflow.py:238-246)
    Option("p", float, 1.0, "adaptive weight power: loss_i = err_i / sg((err_i + eps)^p), err summed over elements "
           "(official 1.0; py-meanflow --norm_p 0.75 on CIFAR)", ge=0),
    Option("eps", float, 0.01, "adaptive weight floor (official 0.01; py-meanflow CIFAR 0.001)", gt=0),
    # training-time CFG (meanflow.py:171-200); effective scale omega' = omega / (1 - kappa)
    Option("omega", float, 1.0, "CFG: v_g = omega v + (1 - omega - kappa) v_u + kappa v_c (omega; 1 with kappa 0: off)",
           ge=0),
    Option("kappa", float, 0.5, "CFG mixing kappa (effective scale omega / (1 - kappa); L/2, XL/2: 0.92)", ge=0, lt=1),
    Option("cfg_t_min", float, 0.0, "CFG applies for t in [cfg_t_min, cfg_t_max], elsewhere v_g = v (XL/2+: 0.3)",
           ge=0, le=1),
    Option("cfg_t_max", float, 1.0, "upper end of the CFG interval (L/2: 0.8, XL/2: 0.75, XL/2+: 0.8)", ge=0, le=1),
    Option("class_drop", float, 0.1, "class-dropout probability: dropped rows train on (null class, v_g = v) "
           "(official cond_drop, 0.1)", ge=0, lt=1),
    Option("drop_rows", str, "first", "which rows are dropped: num_drop = #(rand < class_drop) first rows by index "
           "(official JAX) or a random mask (zhuyu-cs port)", choices=("first", "random")),
    # JVP (meanflow.py:224-236; docs/objectives/meanflow.md, 'The JVP and the attention path')
    Option("jvp_mode", str, "lean", "lean: no-grad JVP on the r != t rows + an ordinary forward for u (memory near a "
           "plain step, DDP syncs as usual); single: one torch.func.jvp returning (u, du/dt) with gradient through u "
           "(py-meanflow; grads all-reduced by hand)", choices=("lean", "single")),
    Option("jvp_impl", str, "auto", "auto: the backbone's hand-written forward_jvp when it has one and is "
           "deterministic (the DiT does: exact, no forward-mode AD, fused attention kept), else torch.func.jvp; "
           "backbone: require forward_jvp; torch: always torch.func.jvp (attention on the math path)",
           choices=("auto", "backbone", "torch")),
    Option("jvp_compile", str, "auto", "torch.compile the backbone's forward_jvp (plain ops, so inductor fuses the "
           "tangent's elementwise work): auto = on CUDA devices only, on, off. No effect with torch.func.jvp",
           choices=("auto", "on", "off")),
    Option("reuse_u_for_cfg", bool, True, "on r = t rows take the CFG conditional velocity v_c = u(z, t, t, y) from "
           "the u forward itself (the same function: the official code evaluates it in eval mode, which is the "
           "same network when no dropout is active) instead of a separate forward; ignored when dropout is active"),
    Option("jvp_fp32", bool, False, "run the JVP with autocast off, as py-meanflow does; False keeps the step's "
           "precision (bf16 under bf16 autocast). The same in fp32 runs, the paper's setting"),
]


@hookimpl
def register_objectives(register):
    register("meanflow", "fewstep_plugins.meanflow.objective:MeanFlow", options=OPTIONS, default_sampler="meanflow",
             description="MeanFlow: average velocity u(z, t, r) trained with a JVP target, training-time CFG")


@hookimpl
def register_samplers(register):
    register("meanflow", "fewstep_plugins.meanflow.sampler:MeanFlowSampler", options=[],
             description="MeanFlow flow-map composition 1 -> 1-1/N -> ... -> 0, z_r = z_t - (t - r) u, no re-noising")

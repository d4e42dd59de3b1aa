"""SoFlow: Solution Flow Models (objective `soflow`, sampler `soflow`).

Defaults are the official ImageNet B/4 config (zlab-princeton/SoFlow imagenet.yaml:9-22;
docs/objectives/soflow.md). The CIFAR-10 config differs in: fm_ratio 0.0,
fm_t (-0.9, 1.6), s (-4.0, 1.6), t (-0.9, 1.6), p 0.75, eps 0.001, r_init 1.0,
r_end 0.0003125, total_steps 800000, no CFG (cfg_scale 1, cfg_drop 0, mix_ratio 1).
"""
from fewstep.api import Option, hookimpl

OPTIONS = [
    # parameterisation (models.py:9-70)
    Option("parameterization", str, "euler",
           "euler: f = x_t + (s - t) F on the linear path (all released configs); trig: f = cos(pi/2 (s-t)) x_t + "
           "sin(pi/2 (s-t)) F on the path cos(pi t/2) x0 + sin(pi t/2) e", choices=("euler", "trig")),
    # batch split and time sampling (train.py:224-266)
    Option("fm_ratio", float, 0.75, "share of the batch (first rows by index) on the flow-matching loss "
           "(velocity_loss_ratio; CIFAR config: 0.0)", ge=0, le=1),
    Option("fm_t_mean", float, -0.2, "FM rows: t ~ sigmoid(N(mean, std)) (mean0)"),
    Option("fm_t_std", float, 1.0, "FM rows: logit-normal std of t (std0)", gt=0),
    Option("s_mean", float, -1.0, "consistency rows: time1 (s candidate) logit-normal mean"),
    Option("s_std", float, 0.8, "consistency rows: time1 logit-normal std", gt=0),
    Option("t_mean", float, 0.2, "consistency rows: time2 (t candidate) logit-normal mean"),
    Option("t_std", float, 0.8, "consistency rows: time2 logit-normal std", gt=0),
    Option("min_gap", float, 1e-4, "t = max(time2, gap), s = min(time1, t - gap), l <= t - gap (hard-coded 1e-4)", gt=0, lt=0.5),
    Option("l_schedule", str, "exponent", "schedule of r(k, K) in l = t + (s - t) r", choices=("const", "linear", "cosine", "exponent")),
    Option("r_init", float, 0.1, "r at step 0", gt=0, le=1),
    Option("r_end", float, 0.002, "r at total_steps", gt=0, le=1),
    Option("total_steps", int, 400_000, "K of the r schedule (the official value, independent of train.steps; "
           "0: use train.steps)", ge=0),
    # adaptive weighting (models.py:152, models.py:199)
    Option("p", float, 1.0, "adaptive weight power: w = 1 / (mean-over-elements MSE + eps)^p (CIFAR 0.75)", ge=0),
    Option("eps", float, 0.01, "adaptive weight floor (CIFAR 0.001)", gt=0),
    # training-time CFG (models.py:130-140, models.py:170-182, models.py:209-215)
    Option("cfg_scale", float, 3.0, "guidance scale w baked into the model (1: off; CIFAR 1)", ge=1),
    Option("cfg_drop", float, 0.1, "label-drop probability: dropped rows train on (null class, raw v)", ge=0, lt=1),
    Option("mix_ratio", float, 0.25, "m in v_tgt = m v_g + (1 - m) v_c (CIFAR 1)", ge=0, le=1),
    Option("cfg_decay_time", float, 0.8, "guidance decays smoothly for t above this time", gt=0, lt=1),
    Option("cfg_decay_k", float, 0.025, "decay constant k of g(t) = 1 - exp(-k d / (1 - d)) (hard-coded 0.025)", gt=0),
]

SAMPLER_OPTIONS = [
    Option("renoise", bool, True, "N-NFE: denoise to 0 from each time, re-noise to the next with fresh noise "
           "(official); False composes f(x, t_i, t_{i+1}) directly"),
]


@hookimpl
def register_objectives(register):
    register("soflow", "fewstep_plugins.soflow.objective:SoFlow", options=OPTIONS, default_sampler="soflow",
             description="Solution Flow: learn f(x_t, t, s) with FM + JVP-free solution consistency + training-time CFG")


@hookimpl
def register_samplers(register):
    register("soflow", "fewstep_plugins.soflow.sampler:SoFlowSampler", options=SAMPLER_OPTIONS,
             description="SoFlow 1-NFE f(e, 1, 0) and N-NFE with re-noising to the next time")

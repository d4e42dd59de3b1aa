"""sCT: continuous-time consistency training in TrigFlow (objective `sct`, sampler `sct`); registration only.

There is no official code: defaults are the paper's CIFAR-10 values (Lu & Song, ICLR 2025, Alg. 1, Sec. 4, App. G.2);
every choice and each difference from NVlabs/FastGen's re-implementation is written down in docs/objectives/sct.md.
"""
from fewstep.api import Option, hookimpl

OPTIONS = [
    Option("sigma_d", float, 0.5, "data standard deviation sigma_d of TrigFlow (paper 0.5)", gt=0),
    Option("p_mean", float, -1.0, "proposal log(sigma_d tan t^) ~ N(p_mean, p_std^2), i.e. fewstep t ~ "
           "sigmoid(N(p_mean, p_std)) (CIFAR-10 -1.0; ImageNet 64 -1.0, ImageNet 512 -0.8)"),
    Option("p_std", float, 1.4, "proposal std (CIFAR-10 1.4; ImageNet 1.6; the ECT comparison at batch 128: 1.8)",
           gt=0),
    Option("tangent_c", float, 0.1, "tangent normalisation g / (||g|| + c) (paper c = 0.1)", ge=0),
    Option("tangent_norm", str, "l2", "the norm in the tangent normalisation: l2 = per-sample L2 over all elements "
           "(paper, as written); rms = L2 / sqrt(D) (FastGen); none = off", choices=("l2", "rms", "none")),
    Option("warmup_steps", int, 10_000, "tangent warm-up: the second term of g is scaled by min(1, step / "
           "warmup_steps) (paper H = 10k; 0: off)", ge=0),
    Option("weighting", str, "adaptive", "adaptive: learned w(t^), loss e^w / D ||.||^2 - w (paper Eq. 8); none: "
           "||.||^2 / D", choices=("adaptive", "none")),
    Option("weight_channels", int, 128, "positional features of t^ feeding the weighting head's linear layer "
           "(FastGen: 128)", ge=2),
    Option("share_dropout", bool, True, "the gradient forward replays the JVP forward's dropout masks (the paper "
           "does not say; FastGen draws different masks)"),
    Option("sigma_max", float, 80.0, "sampling start t^ = arctan(sigma_max / sigma_d), fewstep t = sigma_max / (1 + "
           "sigma_max) (paper: EDM's 80)", gt=0),
    Option("init_from", str, "", "'' = from scratch; a fewstep run folder whose first EMA copy initialises the "
           "backbone on a fresh run (the paper starts from a diffusion model: a fewstep flow-matching run is one)"),
]

SAMPLER_OPTIONS = [
    Option("mid_times", float, [1.1], "TrigFlow times t^ after the start for multi-step sampling (paper 2-step: 1.1, "
           "fewstep t = 0.4956; FastGen: 1.0238, i.e. EDM sigma 0.821); used as given when it holds nfe - 1 values, "
           "else nfe - 1 times evenly spaced in t^ from the start down to its last value", is_list=True, gt=0, lt=1.5708),
    Option("start", str, "sigma_max", "sigma_max: start at t^ = arctan(sigma_max / sigma_d) (paper); noise: at "
           "t^ = pi/2 (fewstep t = 1)", choices=("sigma_max", "noise")),
]


@hookimpl
def register_objectives(register):
    register("sct", "fewstep_plugins.sct.objective:SCT", options=OPTIONS, default_sampler="sct",
             description="continuous-time consistency training (TrigFlow, JVP tangent, tangent normalisation and "
                         "warm-up, adaptive weighting), converted to fewstep time at its boundary")


@hookimpl
def register_samplers(register):
    register("sct", "fewstep_plugins.sct.sampler:SCTSampler", options=SAMPLER_OPTIONS,
             description="sCT 1-step f(80/81 e); N-step: re-noise with fresh noise at TrigFlow 1.1, f again")

"""The `fm` objective (plain flow matching, the multi-step reference) and the `ode` sampler."""
from fewstep.api import Option, hookimpl

FM_OPTIONS = [
    Option("time_dist", str, "logit_normal", "t ~ sigmoid(N(t_mean, t_std)) or U(0, 1)", choices=("logit_normal", "uniform")),
    Option("t_mean", float, 0.0, "logit-normal mean of t"),
    Option("t_std", float, 1.0, "logit-normal std of t", gt=0),
    Option("label_drop", float, 0.1, "probability of training a row on the null class (enables inference CFG)", ge=0, le=1),
]

ODE_OPTIONS = [
    Option("method", str, "euler", "ODE solver from t = 1 to 0", choices=("euler", "heun")),
    Option("cfg_scale", float, 1.0, "inference-time guidance v_u + w (v_c - v_u) (1: none)", ge=0),
]


@hookimpl
def register_objectives(register):
    register("fm", "fewstep_plugins.fm.objective:FlowMatching", options=FM_OPTIONS, default_sampler="ode",
             description="flow matching on x_t = (1 - t) x0 + t e with v = e - x0 (the multi-step reference)")


@hookimpl
def register_samplers(register):
    register("ode", "fewstep_plugins.fm.sampler:ODESampler", options=ODE_OPTIONS,
             description="Euler / Heun integration of the objective's velocity, optional inference CFG")

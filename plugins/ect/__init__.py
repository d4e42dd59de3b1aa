"""ECT: easy consistency training / tuning (objective `ect`, sampler `ect`).

Defaults are the official CIFAR-10 script of locuslab/ect (run_ecm.sh; docs/objectives/ect.md) at
batch 128: P_mean -1.1, P_std 2.0, q 2, k 8, b 1, c 0, the gap halving every 25k steps
(250 ticks of 12.8 kimg), sigma_data 0.5, sigma_max 80, 2-step mid sigma 0.821. The
official optimiser (RAdam 1e-4, betas 0.9/0.999), EMA 0.9999 and dropout 0.2 belong in
the recipe's [train] and [backbone] tables. `schedule = "ict"` selects iCT's discretisation
curriculum (Song & Dhariwal 2023) instead of ECT's continuous one.
"""
from fewstep.api import Option, hookimpl

OPTIONS = [
    Option("schedule", str, "ect", "ect: ln t ~ N(p_mean, p_std), r from the staged sigmoid mapping; ict: iCT's "
           "Karras-grid curriculum with N(k) doubling from s0 to s1", choices=("ect", "ict")),
    Option("p_mean", float, -1.1, "lognormal mean of the noise level t (sigma)"),
    Option("p_std", float, 2.0, "lognormal std of the noise level t (sigma)", gt=0),
    # ECT's mapping r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t)))
    Option("mapping", str, "sigmoid", "ect: r = t (1 - q^-(stage+1) adj) with adj = 1 + k sigmoid(-b t) "
           "(sigmoid, the official default adj='sigmoid') or adj = 1 (const, the official adj='const')",
           choices=("sigmoid", "const")),
    Option("q", float, 2.0, "gap shrink factor per stage (the 1-hour script uses 256)", gt=1),
    Option("k", float, 8.0, "mapping: 1 + k sigmoid(-b t) widens the gap at small t", ge=0),
    Option("b", float, 1.0, "mapping: sigmoid slope", ge=0),
    Option("double_every", int, 25_000, "optimizer steps per stage (official: 250 ticks of 12.8 kimg = 25k steps at "
           "batch 128)", ge=1),
    # iCT's curriculum
    Option("s0", int, 10, "ict: initial number of grid intervals", ge=1),
    Option("s1", int, 1280, "ict: final number of grid intervals", ge=1),
    Option("rho", float, 7.0, "ict: Karras grid exponent", gt=0),
    Option("total_steps", int, 0, "ict: K of N(k) (0: train.steps)", ge=0),
    # loss
    Option("c", float, 0.0, "pseudo-Huber constant: (sqrt(d + c^2) - c) / (t - r); 0 = L2 norm (ECT); iCT uses "
           "0.00054 sqrt(dim)", ge=0),
    Option("grad_nan_to_num", bool, True, "official: gradients pass through nan_to_num (nan -> 0, inf -> +-1e5) before "
           "the step (parameter hooks)"),
    # EDM preconditioning
    Option("sigma_data", float, 0.5, "EDM sigma_data", gt=0),
    Option("sigma_min", float, 0.002, "eval-mode boundary D(x, sigma_min) = x (and iCT's grid minimum)", gt=0),
    Option("sigma_max", float, 80.0, "largest noise level: samplers start at x = sigma_max e", gt=0),
    Option("noise_input", str, "fm", "what the backbone's time inputs get for noise level sigma: 'edm' = "
           "ln(sigma) / 4 (official c_noise), 'fm' = sigma / (1 + sigma) (the time a fewstep flow-matching run saw: "
           "for init_from warm starts)", choices=("fm", "edm")),
    # how to start
    Option("init_from", str, "", "'' = from scratch; a fewstep run folder (or checkpoint folder) whose first EMA copy "
           "is loaded into the backbone on a fresh run (weight-transfer warm start)"),
]

SAMPLER_OPTIONS = [
    Option("mid_sigmas", float, [0.821], "noise levels after sigma_max for multi-step sampling (official 2-step: "
           "0.821); used as given when it holds nfe - 1 values, else nfe - 1 geometric levels from sigma_max down to "
           "its last value", is_list=True, gt=0),
]


@hookimpl
def register_objectives(register):
    register("ect", "fewstep_plugins.ect.objective:ECT", options=OPTIONS, default_sampler="ect",
             description="easy consistency training/tuning: EDM denoiser, D(x_t, t) vs no-grad D(x_r, r), "
                         "L2 / (t - r), gap halving per stage (or iCT's curriculum)")


@hookimpl
def register_samplers(register):
    register("ect", "fewstep_plugins.ect.sampler:ECTSampler", options=SAMPLER_OPTIONS,
             description="ECT 1-step D(80 e, 80); N-step: denoise, re-noise with fresh noise to the next sigma, denoise")

"""iMF: improved MeanFlow (objective `imf`, sampler `imf`, backbone `imfdit`); registration only, torch-free.

Defaults are the official values of Lyy-iiis/imeanflow (imf.py, configs/train_config.yml, models/imfDiT.py); each
option's help names them. docs/objectives/imf.md lists every detail with the official file and line.
"""
from fewstep.api import Option, hookimpl

OPTIONS = [
    Option("t_mean", float, -0.4, "t, r ~ sigmoid(N(t_mean, t_std)), then t = max, r = min (official P_mean -0.4)"),
    Option("t_std", float, 1.0, "logit-normal std of t and r (official P_std 1.0)", gt=0),
    Option("fm_share", float, 0.5, "share of rows with r = t (official data_proportion 0.5)", ge=0, le=1),
    Option("fm_rows", str, "first", "which rows get r = t: the first int(fm_share B) by index (official) or a "
           "Bernoulli(fm_share) mask", choices=("first", "random")),
    Option("p", float, 1.0, "adaptive weight power: err / sg(err + eps)^p per head, err summed over elements "
           "(official norm_p 1.0)", ge=0),
    Option("eps", float, 0.01, "adaptive weight floor (official norm_eps 0.01)", gt=0),
    Option("tangent", str, "v_head", "the JVP tangent and the second loss term: v_head = the backbone's auxiliary "
           "velocity head at gap 0 with its own FM loss (official default); boundary = u(z, t, t), no extra head",
           choices=("v_head", "boundary")),
    Option("cfg_beta", float, 1.0, "omega ~ omega^-beta on [1, 1 + cfg_s_max] (official cfg_beta 1; the paper also "
           "names 2)", ge=0),
    Option("cfg_s_max", float, 7.0, "omega's range is [1, 1 + cfg_s_max] (official default argument s_max = 7)", gt=0),
    Option("interval_min_hi", float, 0.5, "t_min ~ U[0, interval_min_hi] on r != t rows (official 0.5); fm rows 0",
           ge=0, le=1),
    Option("interval_max_lo", float, 0.5, "t_max ~ U[interval_max_lo, 1] on r != t rows (official 0.5); fm rows 1",
           ge=0, le=1),
    Option("class_drop", float, 0.1, "class-dropout probability: dropped rows get the null label and target v "
           "(official class_dropout_prob 0.1)", ge=0, lt=1),
    Option("drop_rows", str, "first", "dropped rows: the first num_drop = #(rand < class_drop) rows by index "
           "(official) or a random mask (imeanflow PR #3)", choices=("first", "random")),
    Option("tangent_label", str, "true", "label of the tangent's velocity on class-dropped rows: true = the row's "
           "real label (official: guidance runs before cond_drop); input = the null label the u pass sees",
           choices=("true", "input")),
    Option("jvp_impl", str, "auto", "auto: the backbone's hand-written forward_jvp when it has one and is "
           "deterministic (imfdit does), else torch.func.jvp; backbone: require it; torch: always torch.func.jvp",
           choices=("auto", "backbone", "torch")),
]

SAMPLER_OPTIONS = [
    Option("omega", float, 1.0, "guidance scale given to the network at every step (1: no guidance; official "
           "1-NFE: B/2 8.0, M/2 and L/2 10.5, XL/2 8.0; XL/2 2-NFE 4.0; training range [1, 8])", ge=1),
    Option("t_min", float, 0.0, "guidance interval start (official 1-NFE: B/2 0.40, M/2 and L/2 0.40, XL/2 0.42; "
           "XL/2 2-NFE 0.36)", ge=0, le=1),
    Option("t_max", float, 1.0, "guidance interval end (official 1-NFE: B/2 0.65, M/2 and L/2 0.60, XL/2 0.62; "
           "XL/2 2-NFE 0.64)", ge=0, le=1),
]

BACKBONE_OPTIONS = [
    Option("size", str, "B/2", "NAME/PATCH with NAME in T (CPU), S, B, M, L, XL (official B/2, M/2, L/2, XL/2)"),
    Option("depth", int, 0, "override the size's depth (0: from size)", ge=0),
    Option("hidden", int, 0, "override the size's width (0: from size)", ge=0),
    Option("heads", int, 0, "override the size's attention heads (0: from size)", ge=0),
    Option("aux_head_depth", int, -1, "blocks in each of the u- and v-heads after the shared trunk (-1: from size; "
           "official 8; T: 2; 0: no v-head, for tangent = 'boundary')", ge=-1),
    Option("mlp_ratio", float, 8 / 3, "SwiGLU hidden width / model width (official 8/3)", gt=0),
    Option("class_tokens", int, 8, "in-context class tokens (official 8)", ge=1),
    Option("cfg_tokens", int, 4, "in-context omega tokens (official 4)", ge=1),
    Option("interval_tokens", int, 2, "in-context tokens for each of t_min and t_max (official 2)", ge=1),
    Option("time_tokens", int, 4, "in-context tokens of the gap h = t - s (official 4)", ge=1),
    Option("weight_init", float, 0.32, "block linears ~ N(0, weight_init^2 / fan_in) (official 0.32)", gt=0),
    Option("token_init", float, 1.0, "prefix tokens ~ N(0, token_init^2 / hidden) (official 1.0)", gt=0),
    Option("embed_init", float, 1.0, "embedder linears and label table ~ N(0, embed_init^2 / fan_in) (official 1.0)",
           gt=0),
    Option("rope_theta", float, 10000.0, "RoPE base (official 10000)", gt=0),
    Option("attention", str, "fused", "'fused' (torch SDPA) or 'math' (explicit einsum + float32 softmax, as the "
           "official torch port)", choices=("fused", "math")),
]


@hookimpl
def register_objectives(register):
    register("imf", "fewstep_plugins.imf.objective:IMF", options=OPTIONS, default_sampler="imf",
             description="improved MeanFlow: V = u + (t - r) sg(du/dt) regressed on the guided velocity, JVP along "
                         "the net's own velocity, guidance scale and interval as conditions")


@hookimpl
def register_samplers(register):
    register("imf", "fewstep_plugins.imf.sampler:IMFSampler", options=SAMPLER_OPTIONS,
             description="iMF flow-map composition 1 -> ... -> 0 with sampling-time guidance (omega, t_min, t_max)")


@hookimpl
def register_backbones(register):
    register("imfdit", "fewstep_plugins.imf.model:build", options=BACKBONE_OPTIONS,
             description="iMF DiT: in-context condition tokens (class, omega, interval, gap; no t), RMSNorm, "
                         "SwiGLU, 1-D RoPE, gated residuals, u- and v-heads")

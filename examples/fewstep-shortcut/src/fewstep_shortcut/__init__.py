"""fewstep-shortcut: shortcut models (Frans, Hafner, Levine, Abbeel 2024) as a fewstep plugin.

This module is what the ``fewstep`` entry point names. fewstep imports it to list plugins and to
validate recipes, so it imports only ``fewstep.api`` (which imports no torch) and names its
factories as lazy ``"module:attr"`` strings: torch and the model code load only when a run builds
the objective or the sampler.
"""
from fewstep.api import PLUGIN_API_VERSION, Option, hookimpl

__version__ = "0.1.0"

#: the fewstep plugin API this package is written against (fewstep.api.PLUGIN_API_VERSION)
PLUGIN_API = 1
if PLUGIN_API_VERSION != PLUGIN_API:
    # raised at import: fewstep lists the plugin as broken with this message and keeps the others working
    raise ImportError(f"fewstep-shortcut {__version__} is written for fewstep plugin API {PLUGIN_API}, "
                      f"but the installed fewstep provides API {PLUGIN_API_VERSION}; install a matching fewstep-shortcut")

OBJECTIVE_OPTIONS = [
    Option("bootstrap_share", float, 0.25,
           "share of the batch (the last rows by index) trained on the self-consistency target; the first rows "
           "are flow matching at d = 0 (paper: 1/4)", ge=0, le=1),
    Option("min_log2", int, 0, "largest step size 2^-min_log2 (0: a single step from noise to data)", ge=0, le=20),
    Option("max_log2", int, 7, "smallest step size 2^-max_log2 (7: the paper's 128 base steps); self-consistency "
           "trains steps 2^-min_log2 .. 2^-(max_log2 - 1) from two half steps", ge=1, le=20),
    Option("time_dist", str, "uniform",
           "flow-matching rows: t ~ U(0, 1), or uniform on {k / 2^max_log2 : k = 1 .. 2^max_log2} (official code)",
           choices=("uniform", "grid")),
    Option("label_drop", float, 0.1,
           "flow-matching rows only: probability of training on the null class (enables inference-time CFG at d = 0)",
           ge=0, le=1),
]


@hookimpl
def register_objectives(register):
    register("shortcut", "fewstep_shortcut.objective:Shortcut", options=OBJECTIVE_OPTIONS, default_sampler="shortcut",
             description="Shortcut models: u(x_t, t, d) conditioned on the step size, FM at d = 0 + self-consistency "
                         "u(2d) = (u(d) + u'(d)) / 2")


@hookimpl
def register_samplers(register):
    register("shortcut", "fewstep_shortcut.sampler:ShortcutSampler", options=[],
             description="nfe equal shortcut steps from t = 1 to 0: x <- x - d u(x, t, d) with d = 1 / nfe")

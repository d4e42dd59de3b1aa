"""Experiment loggers: `jsonl` (metrics.jsonl, the default), `tensorboard`, `wandb` (the optional extra fewstep[wandb]).

Registration only: importing this module imports neither torch, tensorboard nor wandb.
"""
from fewstep.api import Option, hookimpl

JSONL_OPTIONS = [
    Option("file", str, "metrics.jsonl", "file in the run folder, one JSON line per logged step (fewstep plot, "
           "compare and --resume read metrics.jsonl)"),
]

TENSORBOARD_OPTIONS = [
    Option("log_dir", str, "tensorboard", "event folder, relative to the run folder (point `tensorboard --logdir` at it)"),
    Option("flush_secs", int, 30, "seconds between flushes of the event file", ge=1),
    Option("images", bool, True, "also log the sample grids written at evaluation points"),
]

WANDB_OPTIONS = [
    Option("project", str, "fewstep", "Weights & Biases project"),
    Option("entity", str, "", "team or user ('': your default entity)"),
    Option("mode", str, "online", "online, offline (write the run locally; `wandb sync` later) or disabled; the "
           "WANDB_MODE environment variable overrides it", choices=("online", "offline", "disabled")),
    Option("group", str, "", "group runs together in the UI (e.g. one comparison)"),
    Option("tags", str, [], "run tags", is_list=True),
    Option("images", bool, True, "also log the sample grids written at evaluation points"),
]


@hookimpl
def register_loggers(register):
    register("jsonl", "fewstep_plugins.loggers.jsonl:JsonlLogger", options=JSONL_OPTIONS,
             description="one JSON line per logged step in the run folder (metrics.jsonl)")
    register("tensorboard", "fewstep_plugins.loggers.tensorboard:TensorBoardLogger", options=TENSORBOARD_OPTIONS,
             description="TensorBoard event files (torch.utils.tensorboard): scalars, sample grids, the recipe as text")
    register("wandb", "fewstep_plugins.loggers.wandb:WandbLogger", options=WANDB_OPTIONS,
             description="Weights & Biases run (pip install 'fewstep[wandb]'): the recipe as config, scalars, grids")

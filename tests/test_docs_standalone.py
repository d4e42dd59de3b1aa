"""The documentation stands alone: nothing in the repository points at files outside it, and every
official-code citation (file:line) on the objective pages names a file that exists in the official
repository the page is about. The file lists below are those repositories' trees at the commits the
pages name (zlab-princeton/SoFlow 3b60d60f, Gsunshine/meanflow d70cb55d, Gsunshine/py-meanflow 1f6d72d9,
locuslab/ect 4311059, Lyy-iiis/imeanflow bf60cd7c main + 04687983 torch)."""
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "objectives"

OFFICIAL = {
    "zlab-princeton/SoFlow": frozenset("""
        augment.py cifar.yaml dit.py evaluator.py imagenet.yaml inference.py latent_dataset.py models.py 
        readme.md requirements_soflow.txt requirements_soflow_eval.txt train.py unet.py """.split()),
    "Gsunshine/meanflow": frozenset("""
        README.md configs/default.py configs/load_config.py configs/run_b4.yml main.py meanflow.py 
        models/models_dit.py models/timm_models.py models/torch_models.py prepare_dataset.py 
        scripts/install.sh scripts/launch.sh scripts/prepare_data.sh train.py utils/ckpt_util.py 
        utils/data_util.py utils/ema_util.py utils/fid_util.py utils/info_util.py utils/input_pipeline.py 
        utils/jax_fid/fid.py utils/jax_fid/inception.py utils/jax_fid/resize.py utils/jax_fid/utils.py 
        utils/logging_util.py utils/sample_util.py utils/state_util.py utils/vae_util.py utils/vis_util.py """.split()),
    "Gsunshine/py-meanflow": frozenset("""
        README.md environment.yml meanflow/demo.ipynb meanflow/models/augment.py meanflow/models/ema.py 
        meanflow/models/groupnorm.py meanflow/models/meanflow.py meanflow/models/model_configs.py 
        meanflow/models/rng.py meanflow/models/time_sampler.py meanflow/models/unet.py 
        meanflow/scripts/cifar10_v0.sh meanflow/scripts/cifar10_v1.sh meanflow/train.py 
        meanflow/train_arg_parser.py meanflow/training/data_transform.py 
        meanflow/training/distributed_mode.py meanflow/training/eval_loop.py 
        meanflow/training/load_and_save.py meanflow/training/train_loop.py """.split()),
    "locuslab/ect": frozenset("""
        README.md ct_eval.py ct_train.py dataset_tool.py dnnlib/__init__.py dnnlib/util.py env.yml 
        eval_ecm.sh metrics/__init__.py metrics/frechet_inception_distance.py metrics/inception_score.py 
        metrics/kernel_inception_distance.py metrics/metric_main.py metrics/metric_utils.py 
        metrics/perceptual_path_length.py metrics/precision_recall.py run_ecm.sh run_ecm_1hour.sh 
        torch_utils/__init__.py torch_utils/distributed.py torch_utils/misc.py torch_utils/persistence.py 
        torch_utils/training_stats.py training/__init__.py training/augment.py training/ct_training_loop.py 
        training/dataset.py training/loss.py training/networks.py """.split()),
    "Lyy-iiis/imeanflow": frozenset("""
        README.md configs/default.py configs/eval_config.yml configs/load_config.py 
        configs/train_config.yml evaluate.py imf.py main.py models/embedder.py models/imfDiT.py 
        models/torch_models.py prepare_dataset.py requirements.txt scripts/eval.sh scripts/install.sh 
        scripts/prepare_data.sh scripts/train.sh train.py utils/ckpt_util.py utils/data_util.py 
        utils/ema_util.py utils/fid_util.py utils/fidelity_wrapper.py utils/input_pipeline.py 
        utils/jax_fid/inception.py utils/jax_fid/resize.py utils/jax_fid/utils.py utils/logging_util.py 
        utils/lr_utils.py utils/sample_util.py utils/state_util.py utils/torch_dist_util.py 
        utils/torch_util.py utils/trainstate_util.py utils/vae_util.py utils/vis_util.py """.split()),
}

# the official repositories each page is about, and the commit it must name
PAGES = {
    "soflow.md": ({"zlab-princeton/SoFlow"}, ["3b60d60f007b753966c0962cf2179f503e699129"]),
    "meanflow.md": ({"Gsunshine/meanflow", "Gsunshine/py-meanflow"},
                    ["d70cb55d298ee03c53bf6da67bec281082e4e2d9", "1f6d72d94247c8fdeb89489acca1a8007a6baf6c"]),
    "ect.md": ({"locuslab/ect"}, ["4311059770f54821d151a9b0e1f76770a5f3930e"]),
}

# `file.ext:12` or `file.ext:12-30` in backticks: the form the pages use for official code
CITATION = re.compile(r"`([A-Za-z0-9_][A-Za-z0-9_./-]*\.(?:py|ya?ml|sh|md|txt|ipynb)):(\d+)(?:-(\d+))?`")
# pointers outside the repository, or to a numbered section of a document that is not in it
OUTSIDE = [re.compile(re.escape(".." + "/shared")), re.compile(re.escape("shared" + "/spec")),
           re.compile(r"\bspecs?\s+(?:sections?\s+)?\d+(?:\.\d+)?", re.I), re.compile(r"\bspec\s+sections?\b", re.I)]
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "runs", "build", "dist"}


def repository_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git), else a walk without build output."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout.decode()
        files = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        files = [Path(d) / f for d, dirs, names in os.walk(ROOT) for f in names
                 if not (set(Path(d).relative_to(ROOT).parts) & SKIP_DIRS) and ".egg-info" not in d]
    return [p for p in files if p.is_file()]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary files


def test_no_file_points_outside_the_repository():
    files = repository_files()
    assert len(files) > 100 and any(p.name == "soflow.md" for p in files)
    bad = []
    for path in files:
        text = text_of(path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in OUTSIDE):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not bad, "cite the docs pages or the official file:line instead:\n" + "\n".join(bad)


def test_the_patterns_catch_what_they_should():
    spec = "sp" + "ec"  # spelt in two pieces so that this file passes its own scan
    hits = ["see " + ".." + "/shared/" + spec + "/objectives.md", f"({spec} 1.6)", f"{spec} section 3",
            f"{spec.title()} 2.2 - 2.5", f"{spec} sections 1.2, 1.3"]
    misses = ["data.spec.shape", "PluginSpec", "the DataSpec of 3 images", "inspect 2 files", "hookspecs.py:12"]
    assert all(any(p.search(h) for p in OUTSIDE) for h in hits)
    assert not any(p.search(m) for p in OUTSIDE for m in misses)
    assert CITATION.findall("at `models.py:152` and `training/loss.py:39-50`") == [
        ("models.py", "152", ""), ("training/loss.py", "39", "50")]


def citations(page: Path) -> list[tuple[str, int, int]]:
    return [(f, int(a), int(b or a)) for f, a, b in CITATION.findall(page.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_each_page_names_its_official_commits_and_cites_lines(page):
    text = (DOCS / page).read_text(encoding="utf-8")
    repos, commits = PAGES[page]
    for commit in commits:
        assert commit in text, f"{page} must name the official commit {commit}"
    for repo in repos:
        assert repo in text
    assert len(citations(DOCS / page)) >= 20, f"{page} cites too few official lines"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_file_line_citation_names_an_official_file(page):
    repos = PAGES.get(page, (set(OFFICIAL), []))[0]
    allowed = frozenset().union(*(OFFICIAL[r] for r in repos))
    bad = [f"{f}:{a}-{b}" for f, a, b in citations(DOCS / page) if f not in allowed or not 1 <= a <= b]
    assert not bad, f"{page} cites files or lines that are not in {sorted(repos)}: {bad}"

"""The installed package: its public names, what `import ddfp_lib` pulls in, and the README example."""

import re
import subprocess
import sys
from pathlib import Path

import ddfp_lib

ROOT = Path(__file__).resolve().parents[1]


def test_public_contract_names_exist():
    assert isinstance(ddfp_lib.__version__, str) and re.fullmatch(
        r"\d+\.\d+\.\d+.*", ddfp_lib.__version__
    )
    for name in ("FlowDensityEstimator", "DensityDescendingPerturbation", "ConsistencyLoss"):
        assert name in ddfp_lib.__all__ and hasattr(ddfp_lib, name)


def test_top_level_names_are_what_a_training_loop_calls_and_internals_live_in_their_modules():
    from ddfp_lib import perturbations

    assert all(hasattr(ddfp_lib, name) for name in ddfp_lib.__all__)
    assert ddfp_lib.IGNORE_INDEX == 255 and ddfp_lib.UNKNOWN_CLASS == -1
    for name in (
        "MaskRestrictedPerturbation",
        "call_head_without_side_effects",
        "density_descent_direction",
        "virtual_adversarial_direction",
    ):
        assert name not in ddfp_lib.__all__ and name in perturbations.__all__
        assert hasattr(perturbations, name)


def test_import_pulls_in_no_optional_dependency():
    code = (
        "import sys, ddfp_lib\n"
        "banned = ['torchvision', 'matplotlib', 'segmentation_models_pytorch', 'PIL', 'skimage', 'FrEIA', 'tensorboard']\n"
        "print([m for m in banned if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def readme_python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_usage_example_runs_and_trains_the_flow():
    blocks = readme_python_blocks()
    assert blocks, "the README must carry a python usage example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["flow_trainer"].num_steps == 1
    assert namespace["v_ddfp"].shape == namespace["v"].shape
    assert len(blocks[0].strip().splitlines()) <= 25

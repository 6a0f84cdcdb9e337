"""Example-side helpers for training with ddfp_lib: datasets, UniMatch views and a demo dataset.

Kept outside ``ddfp_lib`` because they need torchvision, PIL, scikit-image and mlxtend (the
``[examples]`` extra). Import the submodules directly, e.g.
``from ddfp_examples.datasets import SemiSegDataset``.
"""

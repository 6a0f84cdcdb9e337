"""Doctest collection of ``ddfp_lib`` (``--doctest-modules``): an adapter module whose optional
package is not installed is left out, as its tests skip."""

from __future__ import annotations

import importlib.util

_OPTIONAL = {
    "ddfp_lib/adapters/smp.py": "segmentation_models_pytorch",
    "ddfp_lib/adapters/segmenter.py": "segmentation_models_pytorch",
    "ddfp_lib/adapters/segformer.py": "transformers",
}

collect_ignore = [
    path for path, package in _OPTIONAL.items() if importlib.util.find_spec(package) is None
]

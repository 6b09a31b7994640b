"""`training.report_to`: the experiment trackers transformers' Trainer reports to, checked when a recipe loads.

transformers' own table (`transformers.integrations.INTEGRATION_TO_CALLBACK`) takes seconds to import (it
imports torch), and a recipe is validated before anything heavy loads, so the names and the modules that make
each one usable are listed here; tests/config/test_tracking.py checks that the names match transformers'.
"""

from __future__ import annotations

import importlib.util

from qlora import DISTRIBUTION
from qlora.config.errors import QLoraError, did_you_mean

# integration -> (modules that must import, what to install). Extras of this package where it has one.
INTEGRATIONS = {
    "tensorboard": (("tensorboard",), f"pip install '{DISTRIBUTION}[tensorboard]'"),
    "wandb": (("wandb",), f"pip install '{DISTRIBUTION}[wandb]'"),
    "trackio": (("trackio",), f"pip install '{DISTRIBUTION}[trackio]'"),
    "mlflow": (("mlflow",), f"pip install '{DISTRIBUTION}[mlflow]'"),
    "azure_ml": (("azureml", "azureml.core"), "pip install azureml-core"),
    "comet_ml": (("comet_ml",), "pip install comet-ml"),
    "neptune": (("neptune",), "pip install neptune"),
    "codecarbon": (("codecarbon",), "pip install codecarbon"),
    "clearml": (("clearml",), "pip install clearml"),
    "dagshub": (("dagshub", "mlflow"), "pip install dagshub mlflow"),
    "flyte": (("flytekit",), "pip install flytekit flytekitplugins-deck-standard"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "kubeflow": ((), "set KUBEFLOW_TRAINER_SERVER_URL (Kubeflow's trainer sets it)"),
}
SPECIAL = ("none", "all")  # transformers: no tracker / every installed one


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or half-installed
        return False


def report_targets(value: str | list[str]) -> list[str]:
    """The trackers of `training.report_to` as a list (`none`: empty), each known and installed, else a
    QLoraError naming what to install."""
    names = [value] if isinstance(value, str) else list(value)
    if names in (["none"], []):
        return []
    for name in names:
        if name in SPECIAL and len(names) > 1:
            raise QLoraError(f"training.report_to: '{name}' stands alone, not in a list")
        if name not in INTEGRATIONS and name not in SPECIAL:
            raise QLoraError(
                f"training.report_to: unknown tracker '{name}'{did_you_mean(name, [*SPECIAL, *INTEGRATIONS])}"
            )
        modules, install = INTEGRATIONS.get(name, ((), ""))
        missing = [m for m in modules if not _installed(m)]
        if missing:
            raise QLoraError(f"training.report_to: '{name}' needs {', '.join(missing)}, not installed: {install}")
    return names

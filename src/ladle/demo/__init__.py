"""`ladle demo`: train on a scikit-learn bundled data set, then compare what ladle can make of the run.

The run saves every epoch with EMA on; afterwards the last checkpoint, the
best one, the EMA weights, four soups and a prediction ensemble are each
scored on a held-out test split. Two scenarios: "digits" (1797 digits, an MLP)
and "small-val" (breast_cancer's 569 rows, 114 for validation, an MLP with
BatchNorm and dropout, soups recalibrated, plus the greedy soup for small
validation sets). Modules, one concept each:

    config       DemoConfig: every setting, validated
    data         the data set, split (stratified, seeded) with training-label noise
    model        the MLPs
    evaluation   accuracy, macro-F1, NLL of weight files (single or ensemble)
    training     the training loop with a CheckpointManager and an EMA
    contenders   the final models built from the run, each scored from its file
    table        the rich tables and the summary over seeds
    runner       run_demo: the output folder, the seeds, results.json, report.png
"""

from ladle.demo.config import DemoConfig
from ladle.demo.contenders import Contender
from ladle.demo.evaluation import Scores
from ladle.demo.runner import DemoResult, Progress, load_results, prepare_output, run_demo

__all__ = [
    "Contender",
    "DemoConfig",
    "DemoResult",
    "Progress",
    "Scores",
    "load_results",
    "prepare_output",
    "run_demo",
]

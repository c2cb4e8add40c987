"""Training and evaluating timestep-conditioned transcoders and SAEs on harvested FLUX activations.

- :mod:`~difract_ext.training.specs`: :class:`DictionarySpec`, :class:`TrainConfig`, the DifFRACT
  and TIDE recipes, sparsity sweeps;
- :mod:`~difract_ext.training.trainer`: :func:`train_dictionaries` (one pass, many dictionaries,
  resumable, ``accelerate``/DDP);
- :mod:`~difract_ext.training.evaluation`: held-out FVU / EV / cosine / L0 / dead / dense, per t;
- :mod:`~difract_ext.intervene.generation`: spliced generation with transcoders instead of MLPs;
- :mod:`~difract_ext.training.plots`: sparsity–faithfulness curves;
- :mod:`~difract_ext.cli.eval_job`: :func:`run_evaluation` (``difract eval``).
"""

from difract_ext.training.evaluation import DictionaryEval, evaluate_dictionaries
from difract_ext.cli.eval_job import EvalSummary, run_evaluation
from difract_ext.training.specs import (
    DictionarySpec,
    TrainConfig,
    build_dictionary,
    difract_recipe,
    sweep,
    tide_recipe,
)
from difract_ext.intervene.generation import splice_transcoders, spliced_generation
from difract_ext.training.store import TrainedDictionary, load_dictionaries, load_dictionary
from difract_ext.training.trainer import TrainResult, train_dictionaries

__all__ = [
    "DictionaryEval",
    "DictionarySpec",
    "EvalSummary",
    "TrainConfig",
    "TrainResult",
    "TrainedDictionary",
    "build_dictionary",
    "difract_recipe",
    "evaluate_dictionaries",
    "load_dictionaries",
    "load_dictionary",
    "run_evaluation",
    "splice_transcoders",
    "spliced_generation",
    "sweep",
    "tide_recipe",
    "train_dictionaries",
]

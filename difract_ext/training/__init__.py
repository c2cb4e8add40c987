"""Training and evaluating timestep-conditioned transcoders and SAEs on harvested FLUX activations.

- :mod:`~difract_ext.training.specs`: :class:`DictionarySpec`, :class:`TrainConfig`, the DifFRACT
  and TIDE recipes, sparsity sweeps;
- :mod:`~difract_ext.training.trainer`: :func:`train_dictionaries` (one pass, many dictionaries,
  resumable, ``accelerate``/DDP);
- :mod:`~difract_ext.training.evaluation`: held-out FVU / EV / cosine / L0 / dead / dense, per t;
- :mod:`~difract_ext.training.plots`: sparsity–faithfulness curves;
- :mod:`~difract_ext.training.dictionary_io`: :class:`DictionaryIO`, how modules are built, saved
  and loaded (pass ``io=SAELENS_IO`` from :mod:`difract_ext.adapters.dictionaries`).

Elsewhere: spliced generation is :mod:`difract_ext.intervene.generation`; ``difract eval`` as a
function is :func:`difract_ext.cli.eval_job.run_evaluation`.
"""

from difract_ext.training.dictionary_io import DictionaryIO
from difract_ext.training.evaluation import DictionaryEval, evaluate_dictionaries
from difract_ext.training.specs import (
    DictionarySpec,
    TrainConfig,
    build_dictionary,
    difract_recipe,
    sweep,
    tide_recipe,
)
from difract_ext.training.store import TrainedDictionary, load_dictionaries, load_dictionary
from difract_ext.training.trainer import TrainResult, train_dictionaries

__all__ = [
    "DictionaryEval",
    "DictionaryIO",
    "DictionarySpec",
    "TrainConfig",
    "TrainResult",
    "TrainedDictionary",
    "build_dictionary",
    "difract_recipe",
    "evaluate_dictionaries",
    "load_dictionaries",
    "load_dictionary",
    "sweep",
    "tide_recipe",
    "train_dictionaries",
]

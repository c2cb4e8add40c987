"""Timestep-conditioned dictionaries (transcoders and SAEs), free of FLUX and of any interp library.

- :mod:`~difract_ext.dictionary.timestep`: the sinusoidal t-embedding and t broadcasting;
- :mod:`~difract_ext.dictionary.activations`: ReLU, TopK, JumpReLU;
- :mod:`~difract_ext.dictionary.conditioning`: FiLM conditioning, folding at one t, decoder norms;
- :mod:`~difract_ext.dictionary.difract_format`: reading DifFRACT's released ``.pt`` files.
"""

from difract_ext.dictionary.activations import ACTIVATIONS, ActivationSpec
from difract_ext.dictionary.conditioning import (
    ConditioningFields,
    DecoderNormError,
    FoldedDictionary,
    TimestepConditioned,
)
from difract_ext.dictionary.difract_format import CheckpointError
from difract_ext.dictionary.timestep import TimestepEmbeddingSpec, TimestepError

__all__ = [
    "ACTIVATIONS",
    "ActivationSpec",
    "CheckpointError",
    "ConditioningFields",
    "DecoderNormError",
    "FoldedDictionary",
    "TimestepConditioned",
    "TimestepEmbeddingSpec",
    "TimestepError",
]

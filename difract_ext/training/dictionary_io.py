"""How training makes, writes and reads dictionary modules, without naming a library.

The trainer needs three things from a dictionary library: a fresh module for a
:class:`~difract_ext.training.specs.DictionarySpec`, a way to write a trained one to a folder,
and a way to read that folder back. :class:`DictionaryIO` is that contract; the core never
imports SAELens. The SAELens implementation is
:data:`difract_ext.adapters.dictionaries.SAELENS_IO` (folders ``cfg.json`` +
``sae_weights.safetensors`` that ``sae_lens.SAE.load_from_disk`` reads), and the application
layer (``difract train`` / ``difract eval``) passes it.

A module returned by :meth:`DictionaryIO.build` must behave like our conditioned dictionaries:
``encode(x, t=t) -> z [..., d_sae]``, ``decode(z, t=t) -> [..., d_out]``, ``cfg.d_sae``,
``W_dec [d_sae, d_out]``, ``b_enc [d_sae]`` and the conditioning parameters of
:class:`~difract_ext.dictionary.TimestepConditioned`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["DictionaryIO"]


@runtime_checkable
class DictionaryIO(Protocol):
    """Build, save and load the dictionary modules the trainer trains."""

    def build(
        self,
        role: str,
        d_model: int,
        d_sae: int,
        *,
        activation: str,
        k: int | None,
        d_t_embed: int,
        trained_timesteps: list[float] | None,
        metadata: dict[str, Any],
        device: str,
    ) -> torch.nn.Module:
        """A freshly initialised dictionary on ``[..., d_model]`` activations.

        Args:
            role: ``"transcoder"`` (``[..., d_model]`` MLP input -> output) or ``"sae"``.
            d_model: activation width (input and output).
            d_sae: number of features.
            activation: ``"relu"`` or ``"topk"`` (with ``k`` active features per row).
            d_t_embed: width of the timestep embedding.
            trained_timesteps: the t values of the training data (recorded, not enforced).
            metadata: SAELens-style metadata (hook names, site, model).
            device: where the parameters live.

        Initialisation draws from the global torch RNG; the caller seeds it
        (:func:`~difract_ext.training.specs.build_dictionary`).
        """
        ...

    def save(self, module: torch.nn.Module, path: Path) -> None:
        """Write ``module`` into the (existing, empty) folder ``path``."""
        ...

    def load(self, path: Path, device: str) -> torch.nn.Module:
        """Read a folder written by :meth:`save`."""
        ...

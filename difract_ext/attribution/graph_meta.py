"""What an attribution graph of one FLUX denoising step is about, beside circuit-tracer's ``Graph``.

A graph (:class:`~difract_ext.attribution.row_graph.RowGraph`, or circuit-tracer's ``Graph``)
follows circuit-tracer's node order (rows = targets, columns = sources; selected features, error
nodes ``layer-major (l * P + p)``, input nodes (P), targets (K)). ``GraphMeta`` adds what a
diffusion graph needs to be read:

- **positions**: one joint order, text first: positions ``0 .. n_txt - 1`` are text tokens,
  ``n_txt .. P - 1`` image patches in row-major order over ``grid = (rows, cols)``;
- **layers**: ``0 .. n_double - 1`` are double-stream blocks (features of both streams),
  ``n_double .. n_layers - 1`` single-stream blocks (no transcoders: error-only layers);
- **feature ids** in a double layer: ``[0, d_img[l])`` image-stream features, then text-stream
  features offset by ``d_img[l]``; :data:`RESIDUE_FEATURE` marks the *unexplored-feature residue*
  node of a (layer, position): the summed direct effect of active features that were not expanded;
- the run: prompt, seed, step index, the timestep the transformer received, targets' labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from difract_ext.util.config import config_from_dict, config_to_dict

#: Feature id of the unexplored-feature residue node at a (layer, position).
RESIDUE_FEATURE = -2


@dataclass
class GraphMeta:
    """Everything about a graph that circuit-tracer's ``Graph`` does not store."""

    prompt: str
    seed: int
    step: int
    timestep: float
    num_inference_steps: int
    n_txt: int
    grid: tuple[int, int]
    text_tokens: list[str]
    n_double: int
    n_layers: int
    d_img: dict[int, int]
    target_labels: list[str]
    model_name: str = "flux"
    height: int | None = None
    width: int | None = None
    #: freezes lifted from the edges (``FrozenFlux``'s ``live``): empty for circuit-tracer's
    #: affine graph, else first-order edges
    live: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.grid = (int(self.grid[0]), int(self.grid[1]))
        self.d_img = {int(k): int(v) for k, v in self.d_img.items()}
        self.live = sorted(self.live)
        if len(self.text_tokens) != self.n_txt:
            raise ValueError(
                f"text_tokens has {len(self.text_tokens)} labels for n_txt={self.n_txt}"
            )
        if not 0 <= self.n_double <= self.n_layers:
            raise ValueError(f"n_double={self.n_double} must be within 0..n_layers={self.n_layers}")

    @property
    def n_img(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_pos(self) -> int:
        return self.n_txt + self.n_img

    def position_label(self, pos: int) -> str:
        """``'txt 3 "cat"'`` for text positions, ``'img r2c5'`` for image patches."""
        if not 0 <= pos < self.n_pos:
            raise IndexError(f"position {pos} outside 0..{self.n_pos - 1}")
        if pos < self.n_txt:
            return f'txt {pos} "{self.text_tokens[pos]}"'
        r, c = divmod(pos - self.n_txt, self.grid[1])
        return f"img r{r}c{c}"

    def position_kind(self, pos: int) -> tuple[str, int, int]:
        """``("txt", token_index, -1)`` or ``("img", row, col)``."""
        if pos < self.n_txt:
            return ("txt", pos, -1)
        r, c = divmod(pos - self.n_txt, self.grid[1])
        return ("img", r, c)

    def layer_label(self, layer: int) -> str:
        return f"double {layer}" if layer < self.n_double else f"single {layer - self.n_double}"

    def feature_stream(self, layer: int, feature: int) -> str:
        """``"img"``, ``"txt"`` (double layers) or ``"residue"``."""
        if feature == RESIDUE_FEATURE:
            return "residue"
        if layer >= self.n_double:
            raise ValueError(f"layer {layer} is a single-stream block: it has no features")
        return "img" if feature < self.d_img.get(layer, 0) else "txt"

    def stream_feature_index(self, layer: int, feature: int) -> int:
        """The feature's index inside its own stream's dictionary."""
        return (
            feature if self.feature_stream(layer, feature) == "img" else feature - self.d_img[layer]
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (``grid`` a list, ``d_img`` keys strings)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "graph metadata") -> GraphMeta:
        """Inverse of :meth:`to_dict` (types checked; ``source`` names the file in errors)."""
        return config_from_dict(cls, d, source)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

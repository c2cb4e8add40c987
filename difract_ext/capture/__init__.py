"""Harvesting FLUX MLP activations to disk (resumable shards + manifest) and reading them back.

- :func:`harvest` / :class:`HarvestConfig`: run a pipeline and write ``(x, y, t)`` rows per site;
- :class:`HarvestReader`: read committed shards (format in :mod:`difract_ext.capture.format`);
- :mod:`difract_ext.cli.sources`: pipelines and prompt lists by name.
"""

from difract_ext.capture.format import HarvestFormatError, HarvestReader, ShardInfo
from difract_ext.capture.harvest import TEXT_PADDING, HarvestConfig, HarvestResult, harvest

__all__ = [
    "TEXT_PADDING",
    "HarvestConfig",
    "HarvestFormatError",
    "HarvestReader",
    "HarvestResult",
    "ShardInfo",
    "harvest",
]

"""What makes a training run resumable: its identity (fingerprint) and a checked position.

A resume must refuse a changed identity: other specs or recipe, other data under the same shard
names (shards are digested by content, :func:`~difract_ext.util.digest.file_digest`), another
model's harvest; and a checkpoint whose fields do not fit the run (a corrupt step count would
otherwise "finish" early).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difract_ext.capture.format import HarvestReader
from difract_ext.training.specs import DictionarySpec, TrainConfig
from difract_ext.util.digest import file_digest

__all__ = ["checked_position", "run_fingerprint"]

_NON_IDENTITY = (
    "checkpoint_every_steps",
    "checkpoint_every_seconds",
    "stop_after_steps",
    "log_every",
)


def run_fingerprint(
    reader: HarvestReader, specs: Sequence[DictionarySpec], cfg: TrainConfig
) -> str:
    """The identity a checkpoint or finished run must match to be resumed or reused: specs,
    config (without its scheduling fields), the data by sampled content, the harvest's model."""
    blob = json.dumps(
        {
            "specs": [s.to_json() for s in specs],
            "config": {k: v for k, v in cfg.to_json().items() if k not in _NON_IDENTITY},
            # the data by content (sampled), not by names: another harvest under the same
            # shard names, or another model's (recorded in its config), is another fingerprint
            "shards": [[s.file, file_digest(reader.root / s.file)] for s in reader.shards],
            "model": reader.config.get("model_digest"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def checked_position(
    ck: dict[str, Any], path: Path, per_group: Sequence[int], names: Sequence[str]
) -> tuple[tuple[int, int], int]:
    """``((group, batch), global_step)`` of a checkpoint, each field checked: integers in range,
    the global step equal to the batches before ``(group, batch)``, every dictionary present."""
    fields = {k: ck.get(k) for k in ("group", "batch", "global_step")}
    bad = [k for k, v in fields.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    group, batch, step = fields["group"], fields["batch"], fields["global_step"]
    in_range = (group < len(per_group) and batch <= per_group[group]) if not bad else False
    if not bad and not (in_range or (group, batch) == (len(per_group), 0)):
        bad = ["group", "batch"]
    if not bad and step != sum(per_group[:group]) + batch:
        bad = ["global_step"]
    saved = ck.get("dictionaries")
    missing = [n for n in names if not isinstance(saved, dict) or n not in saved]
    if bad or missing:
        what = f"fields {', '.join(bad)} ({fields})" if bad else f"dictionaries {missing}"
        raise ValueError(
            f"{path} is corrupt: {what} do not fit this run ({len(per_group)} shard groups of "
            f"{list(per_group)} batches); delete it to train from the start"
        )
    return (group, batch), step

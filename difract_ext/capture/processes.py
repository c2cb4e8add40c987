"""Process-group set-up shared by harvesting and training (``accelerate``).

``accelerate``'s CPU path only forms a process group when asked for the CPU explicitly; we do so
when ``ACCELERATE_USE_CPU`` is set or no CUDA device exists. So all of these give 2 processes:

    # GPUs, or a CPU-only host:
    accelerate launch --multi_gpu --num_processes 2 -m difract_ext.cli train ...
    # any host:
    torchrun --nproc_per_node 2 -m difract_ext.cli train ...
"""

from __future__ import annotations

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env


def use_cpu() -> bool:
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def process_state() -> PartialState:
    """The (shared) ``accelerate`` process state: rank, world size, device, barriers."""
    return PartialState(cpu=use_cpu())


def make_accelerator() -> Accelerator:
    """An ``Accelerator`` on the same process group as :func:`process_state`."""
    return Accelerator(cpu=use_cpu())

"""Where training is: the small record a checkpoint stores per rank and a resume restores.

Its own module because both the trainer (which advances it) and the checkpointer (which
saves and loads it) need it, and the checkpointer must not import the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    """``micro_step`` counts batches of ``epoch``; ``global_step`` counts optimizer steps."""

    epoch: int = 0
    micro_step: int = 0
    global_step: int = 0  # optimizer steps
    samples_seen: int = 0  # on this rank
    keys_initialised: bool = False

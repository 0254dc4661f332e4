"""The global RNG streams (sampling, dropout) saved in a checkpoint, so that ``--ckpt_path`` resumes them exactly."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_states() -> dict:
    """The global RNG states, in types a weights-only checkpoint load accepts."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.copy()), position, has_gauss, gauss)
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy(), position, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])

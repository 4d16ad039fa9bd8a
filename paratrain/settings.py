"""The Python API's settings: the Trainer's keyword arguments as a RunConfig.

A setting is a field of LayoutConfig or TrainConfig under its own name, or one of the checkpoint
fields under the name of its flag (`checkpoint_dir`, `checkpoint_every`, ...).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from paratrain.config import ConfigError, LayoutConfig, RunConfig, TrainConfig, merge

CHECKPOINT_SETTINGS = {"checkpoint_dir": "dir", "checkpoint_every": "every", "keep_checkpoints": "keep",
                       "resume": "resume", "async_checkpoint": "async_save", "snapshot_every": "snapshot_every",
                       "snapshot_dir": "snapshot_dir"}
API_DEFAULTS = {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0, "min_lr_ratio": 1.0, "eval_every": 0}


def api_config(settings: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A RunConfig from the Python API's keyword settings (unknown names are one-line errors).
    Without `base`, the API's defaults: a constant learning rate, no weight decay."""
    cfg = copy.deepcopy(base) if base is not None else RunConfig()  # the caller's config stays as it is
    if base is None:
        for key, value in API_DEFAULTS.items():
            setattr(cfg.train, key, value)
    sections: dict[str, dict] = {}
    layout = {f.name for f in dataclasses.fields(LayoutConfig)} - {"dp", "tp", "pp"}
    train = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in settings.items():
        if key in CHECKPOINT_SETTINGS:
            sections.setdefault("checkpoint", {})[CHECKPOINT_SETTINGS[key]] = value
        elif key in layout or key in train:
            sections.setdefault("layout" if key in layout else "train", {})[key] = value
        else:
            known = sorted(layout | train | set(CHECKPOINT_SETTINGS))
            raise ConfigError(f"Trainer: unknown setting {key!r}; known: {', '.join(known)}")
    merge(cfg, sections, source="Trainer")
    return cfg

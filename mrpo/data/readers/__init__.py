"""Readers of public medical VQA data sets in their published on-disk formats.

`READERS[name](root, columns=None, *, image_root=None, files=None, notes=None, ...) -> Iterator[Row]`;
each module's docstring describes the layout it expects; a reader that skips a whole file (not a data
file of its format) appends one line naming it to `notes`. Readers yield every row they meet (malformed
ones with `Row.error`, intentionally excluded ones with `Row.skip`); `mrpo.data.prepare` validates,
aligns MedThink rationales and writes the project's JSONL records.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

from .common import DataError, Row
from .generic import read_generic
from .hf import read_hf
from .medthink import read_medthink
from .pathvqa import read_pathvqa
from .pmc_vqa import read_pmc_vqa
from .slake import read_slake
from .vqa_med import read_vqa_med
from .vqa_rad import read_vqa_rad

READERS: dict[str, Callable[..., Iterator[Row]]] = {
    # training sets (with MedThink rationales)
    "vqa_rad": read_vqa_rad,
    "slake": read_slake,
    "pathvqa": read_pathvqa,
    # evaluation sets
    "pmc_vqa": read_pmc_vqa,
    "vqa_med": read_vqa_med,
    "quilt_vqa": partial(read_generic, split="test"),          # single evaluation split
    "rad_vqa": partial(read_generic, default_split="test"),
    "mimic_vqa": partial(read_generic, default_split="test"),
    # any layout
    "generic": read_generic,
    "hf": read_hf,
}

__all__ = ["READERS", "Row", "DataError", "read_medthink"]

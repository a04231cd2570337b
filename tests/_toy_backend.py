"""A toy third generation, reference-only, written the way docs/architecture.md says to add one.

It is one module: its library (never installed), its buffer class (the reference ElasticBuffer under another
name), its sizing plan (elastic's, plus an injectable construction failure), its two paths (elastic's) and its
reference provider. Importing it registers nothing; ``ensure_registered()`` does, in whichever process calls it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch.distributed as dist

from deepep_switch.backends import BackendSpec, BufferPlan, Library, elastic, is_registered, register
from deepep_switch.config import DeepepWrapperConfig
from deepep_switch.providers.reference import ReferenceElasticBuffer
from deepep_switch.settings import SwitchSettings

FAIL_RANK_ENV = "TOY_FAIL_CONSTRUCTION_ON_RANK"


class ToyBuffer(ReferenceElasticBuffer):
    """The toy generation's buffer: the V2 API, under its own class."""


def plan(buffer_cls: Any, group: dist.ProcessGroup, config: DeepepWrapperConfig,
         settings: SwitchSettings) -> BufferPlan:
    if os.environ.get(FAIL_RANK_ENV) == str(dist.get_rank(group)):
        raise RuntimeError("toy: injected construction failure")
    return dataclasses.replace(elastic.plan(buffer_cls, group, config, settings), backend=SPEC.backend)


SPEC = BackendSpec(
    name="toy",
    summary="a reference-only toy generation (tests)",
    library=Library(modules=("deepep_toy_library",), attribute="ToyBuffer", import_check="deepep_toy_import",
                    api_check="toy_api", install_hint="the toy generation exists only with the reference provider"),
    reference=lambda: ToyBuffer,
    plan=plan,
    normal_path=elastic.ElasticNormalPath,
    low_latency_path=elastic.ElasticLowLatencyPath,
    raw_round_trip=elastic.raw_round_trip,
    auto_priority=30,  # above every built-in generation (ep: 20)
)


def ensure_registered() -> BackendSpec:
    if not is_registered(SPEC.name):
        register(SPEC)
    return SPEC

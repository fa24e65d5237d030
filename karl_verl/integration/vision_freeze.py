"""Freeze a vision-language model's vision tower and multimodal projector in verl's SFT trainer (FSDP/FSDP2).

verl 0.9.1 trains every parameter (``freeze_vision_tower`` is a config field nothing reads). The
released stage-1 run (LLaMA-Factory ``freeze_vision_tower: true``, ``freeze_multi_modal_projector:
true``) trains the language model only; this module reproduces that in three thin pieces:

* :func:`freeze_vision` sets ``requires_grad=False`` on the vision tower and/or the projector of a
  transformers model, by the same module names LLaMA-Factory uses (:data:`COMPOSITE_MODELS`).
  Frozen parameters then get no ``.grad`` (no gradient memory), and AdamW, which skips parameters
  without a gradient, neither moves them nor keeps optimizer state for them (weight decay included).
* :func:`frozen_engine_class` derives, from a verl FSDP engine class, one whose ``_build_module``
  (where verl loads the Hugging Face model, before FSDP wraps it and before the optimizer is built)
  calls :func:`freeze_vision` on the freshly loaded model. FSDP2's ``fully_shard`` keeps each
  parameter's ``requires_grad``, so the freeze holds per parameter after sharding. FSDP1 without
  ``use_orig_params`` flattens frozen and trainable parameters into one tensor and is refused.
* :class:`VisionFreezeCallback`, a Hydra callback the ``karl_cot_sft`` recipe lists, reads
  ``karl.sft.*`` (:class:`VisionFreezeConfig`) in every process that runs ``python -m
  verl.trainer.sft_trainer`` (torchrun starts one per GPU, each runs the callbacks) before verl builds
  anything, and puts those engine classes in verl's engine registry for ``language_model`` on the
  ``fsdp`` and ``fsdp2`` backends (:func:`install_vision_freeze`). Only that process is affected:
  the RL recipes never list the callback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

#: model_type -> (vision tower module paths, projector module paths), as LLaMA-Factory registers them
#: (``model/model_utils/visual.py``). Paths are matched as whole dotted segments anywhere in a
#: parameter name, so ``visual.blocks`` finds ``model.visual.blocks.0.attn.qkv.weight`` (recent
#: transformers nest ``visual`` under ``model``; older releases had it at the top).
COMPOSITE_MODELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "qwen2_vl": (("visual.patch_embed", "visual.blocks"), ("visual.merger",)),
    "qwen2_5_vl": (("visual.patch_embed", "visual.blocks"), ("visual.merger",)),
    "qwen3_vl": (("visual.pos_embed", "visual.patch_embed", "visual.blocks", "visual.deepstack_merger_list"),
                 ("visual.merger",)),
    "qwen3_vl_moe": (("visual.pos_embed", "visual.patch_embed", "visual.blocks", "visual.deepstack_merger_list"),
                     ("visual.merger",)),
}

#: The verl backends whose language-model engines get the freeze.
FSDP_BACKENDS: tuple[str, ...] = ("fsdp", "fsdp2")


class VisionFreezeError(ValueError):
    """The freeze cannot be applied as configured (unknown architecture, renamed modules, FSDP1 flat params)."""


@dataclass(frozen=True)
class VisionFreezeConfig:
    """``karl.sft.*`` of the ``karl_cot_sft`` recipe; the defaults are the released stage-1 run's."""

    #: Freeze the vision encoder (patch embedding, position embedding, blocks, DeepStack mergers).
    freeze_vision_tower: bool = True
    #: Freeze the multimodal projector (Qwen-VL's ``visual.merger``).
    freeze_multi_modal_projector: bool = True

    @property
    def freezes_anything(self) -> bool:
        return self.freeze_vision_tower or self.freeze_multi_modal_projector

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None, where: str = "karl.sft") -> VisionFreezeConfig:
        """From a config section; null values keep the defaults, unknown keys and non-booleans are errors."""
        values = dict(section or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise VisionFreezeError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")
        checked = {}
        for name, value in values.items():
            if value is None:
                continue
            if not isinstance(value, bool):
                raise VisionFreezeError(f"{where}.{name}: expected true or false, got {value!r}")
            checked[name] = value
        return cls(**checked)


@dataclass(frozen=True)
class FreezeReport:
    """What :func:`freeze_vision` froze: parameter names and element counts per part."""

    model_type: str
    vision_tower: tuple[str, ...]
    projector: tuple[str, ...]
    frozen_numel: int
    trainable_numel: int

    def format(self) -> str:
        return (f"karl-verl: froze {len(self.vision_tower)} vision-tower and {len(self.projector)} projector "
                f"tensors of {self.model_type} ({self.frozen_numel:,} parameters); "
                f"{self.trainable_numel:,} parameters train")


def _matches(name: str, key: str) -> bool:
    return f".{key}." in f".{name}"


def _model_type(model: Any) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise VisionFreezeError(f"{type(model).__name__} has no config.model_type; cannot tell its vision modules")
    return model_type


def freeze_vision(model: Any, config: VisionFreezeConfig = VisionFreezeConfig()) -> FreezeReport:
    """Set ``requires_grad=False`` on the parts ``config`` names; call before FSDP wraps ``model``.

    Raises :class:`VisionFreezeError` for an architecture absent from :data:`COMPOSITE_MODELS` or
    when a listed module path matches no parameter (modules renamed by a transformers release: a
    silent no-op would train what should be frozen).
    """
    model_type = _model_type(model)
    named = list(model.named_parameters())
    if not config.freezes_anything:
        return FreezeReport(model_type, (), (), 0, sum(p.numel() for _, p in named if p.requires_grad))
    if model_type not in COMPOSITE_MODELS:
        raise VisionFreezeError(f"no vision-freeze mapping for model type {model_type!r}; "
                                f"known: {sorted(COMPOSITE_MODELS)}")
    tower_keys, projector_keys = COMPOSITE_MODELS[model_type]
    wanted = [*(tower_keys if config.freeze_vision_tower else ()),
              *(projector_keys if config.freeze_multi_modal_projector else ())]
    unmatched = [key for key in wanted if not any(_matches(name, key) for name, _ in named)]
    if unmatched:
        raise VisionFreezeError(f"{model_type}: no parameter under {unmatched}; the model's modules are not named "
                                "as expected (a different transformers version?)")
    parts: dict[str, list[str]] = {"tower": [], "projector": []}
    for name, parameter in named:
        part = ("projector" if any(_matches(name, key) for key in projector_keys) else
                "tower" if any(_matches(name, key) for key in tower_keys) else None)
        chosen = {"tower": config.freeze_vision_tower, "projector": config.freeze_multi_modal_projector}
        if part is not None and chosen[part]:
            parameter.requires_grad_(False)
            parts[part].append(name)
    frozen = sum(p.numel() for _, p in named if not p.requires_grad)
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    return FreezeReport(model_type, tuple(parts["tower"]), tuple(parts["projector"]), frozen, trainable)


class VisionFreezeEngineMixin:
    """Mixed in front of a verl FSDP engine: freezes after verl loads the model, before FSDP and the optimizer."""

    #: Set on each derived class by :func:`frozen_engine_class`.
    karl_vision_freeze: VisionFreezeConfig = VisionFreezeConfig()
    #: The verl engine class this one derives from.
    karl_base_engine: type | None = None

    def _build_module(self):  # verl's hook point: FSDPEngine._build_model_optimizer calls it first
        engine_config = self.engine_config  # type: ignore[attr-defined]
        if engine_config.strategy == "fsdp" and not engine_config.use_orig_params:
            raise VisionFreezeError("the vision freeze needs engine.strategy=fsdp2 (or fsdp with "
                                    "engine.use_orig_params=true): FSDP1 flat parameters cannot mix frozen and "
                                    "trainable tensors")
        module = super()._build_module()  # type: ignore[misc]
        report = freeze_vision(module, self.karl_vision_freeze)
        import torch.distributed

        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(report.format(), flush=True)
        return module


def frozen_engine_class(engine_class: type, config: VisionFreezeConfig) -> type:
    """``engine_class`` with :class:`VisionFreezeEngineMixin` in front, freezing as ``config`` says."""
    base = getattr(engine_class, "karl_base_engine", None) or engine_class
    return type(f"KarlVisionFrozen{base.__name__}", (VisionFreezeEngineMixin, base),
                {"karl_vision_freeze": config, "karl_base_engine": base, "__module__": __name__})


def _language_model_engines() -> dict[str, dict[Any, type]]:
    from verl.workers.engine import EngineRegistry

    # verl registers engines with a decorator that refuses a second class for the same key, so the
    # classes are swapped in its table: {model_type: {backend: {device or (device, vendor): class}}}.
    return {backend: EngineRegistry._engines.get("language_model", {}).get(backend, {}) for backend in FSDP_BACKENDS}


def install_vision_freeze(config: VisionFreezeConfig) -> list[str]:
    """Make verl's FSDP/FSDP2 language-model engines of this process freeze as ``config`` says.

    Every registered device's engine class is replaced by :func:`frozen_engine_class` of it (its
    original when already replaced); with nothing to freeze the originals are put back. Returns
    the names of the classes now registered.
    """
    installed = []
    for table in _language_model_engines().values():
        for key, engine_class in list(table.items()):
            base = getattr(engine_class, "karl_base_engine", None) or engine_class
            table[key] = frozen_engine_class(base, config) if config.freezes_anything else base
            installed.append(table[key].__name__)
    if config.freezes_anything and not installed:
        raise VisionFreezeError("verl registers no fsdp/fsdp2 language-model engine in this process")
    return installed


def vision_freeze_config(config: DictConfig) -> VisionFreezeConfig:
    """``karl.sft`` of a composed verl config as a :class:`VisionFreezeConfig`."""
    section = OmegaConf.select(config, "karl.sft", default=None)
    return VisionFreezeConfig.from_section(
        OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else section)


class VisionFreezeCallback(Callback):
    """Hydra callback of ``karl_cot_sft``: installs the freeze before verl's SFT trainer builds its engine."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            install_vision_freeze(vision_freeze_config(config))
        except VisionFreezeError as err:
            # SystemExit, not an exception: Hydra logs and swallows exceptions raised by callbacks,
            # and the run would then train the vision tower it was asked to freeze.
            raise SystemExit(f"karl-verl: {err}") from None

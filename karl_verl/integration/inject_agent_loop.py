"""Agent loop ``karl_inject_agent``: verl's single-turn loop, with external responses for planned sessions.

Runs in verl's agent-loop workers (any node). verl runs ``rollout.n`` sessions per prompt, with
``session_id`` 0..n-1, each in its own agent-loop instance, and passes every prompt field as a
keyword. The ``karl`` trainer puts two fields on each training prompt (validation prompts carry
neither, so they are always sampled):

* ``karl_inject_sessions``: how many sessions (the first ones) get an external response;
* ``karl_reference``: the reference response of the prompt's instance (source "file"), or "".

An injected session runs verl's own single-turn loop (multimodal inputs, prompt tokens, the
response merge and truncation to ``rollout.response_length``) against a stand-in for the rollout
server that answers with the external response tokenised by the policy's tokenizer, ending with
its EOS as a generated response does; a vision special token written in the text (a teacher may
write one) becomes its characters, not an image token (:func:`~karl_verl.inject.response_token_ids`).
With ``karl.inject.source=teacher`` the stand-in asks the teacher endpoint (OpenAI-compatible,
:class:`~karl_verl.data.teacher.ChatCompletionsTeacher`) for the prompt's text and images, in a
thread, within ``karl.inject.teacher_timeout_s``; a failed, late or empty reply falls back to a
normal sample, recorded as ``extra_fields["karl_inject"] = "fallback"`` and counted by the trainer.

Every row this loop returns carries the tensor field ``karl_injected`` (1 injected, 0 sampled)
into TransferQueue, and from there into the actor's update batches, where
:func:`~karl_verl.integration.inject_loss.karl_inject_ppo_loss` reads it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, _agent_loop_registry
from verl.experimental.agent_loop.agent_loop import register as register_in_verl
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
from verl.workers.rollout.replica import TokenOutput

from karl_verl.backends.base import BackendError, GenerationRequest, SamplingSettings
from karl_verl.config import InjectConfig
from karl_verl.data.teacher import ChatCompletionsTeacher
from karl_verl.inject import is_injected_session, response_token_ids, vision_tokens
from karl_verl.integration.inject_loss import INJECTED_FIELD

REGISTRY = "agent loop (verl.experimental.agent_loop)"
NAME = "karl_inject_agent"

#: Prompt fields the trainer sets (see the module docstring).
SESSIONS_FIELD = "karl_inject_sessions"
REFERENCE_FIELD = "karl_reference"
#: ``extra_fields`` key of a session planned for injection: "injected" or "fallback".
STATUS_KEY = "karl_inject"

logger = logging.getLogger(__name__)


class InjectedOutput(AgentLoopOutput):
    """verl's agent-loop output plus the per-row flag, a tensor field in TransferQueue."""

    karl_injected: int = 0

    def as_dict(self) -> dict[str, Any]:
        output = super().as_dict()
        output[INJECTED_FIELD] = torch.tensor(self.karl_injected, dtype=torch.int64)
        return output


def with_flag(output: AgentLoopOutput, injected: bool) -> InjectedOutput:
    """``output`` as an :class:`InjectedOutput`, keeping which fields were set (``as_dict`` dumps only those)."""
    fields = {name: getattr(output, name) for name in output.model_fields_set}
    flagged = InjectedOutput(**fields, karl_injected=int(injected))
    flagged.extra_fields = output.extra_fields
    return flagged


class ExternalResponseServer:
    """Stands in for the rollout server of one session: answers ``generate`` with an external response.

    ``response_text(images)`` gives the text, or None to fall back to ``policy_server`` (a normal
    sample). ``injected`` says afterwards which of the two happened.
    """

    def __init__(self, policy_server: Any, response_text: Callable[[list[Any]], Awaitable[str | None]],
                 tokenize: Callable[[str], list[int]], weights_version: int | None) -> None:
        self._policy_server = policy_server
        self._response_text = response_text
        self._tokenize = tokenize
        self._weights_version = weights_version
        self.injected = False

    async def generate(self, **request: Any) -> TokenOutput:
        text = await self._response_text(list(request.get("image_data") or []))
        if not text:
            return await self._policy_server.generate(**request)
        self.injected = True
        token_ids = self._tokenize(text)
        # Rows sampled with log-probs carry rollout_log_probs; an injected row must too (TransferQueue
        # wants a field on all rows or none): the behaviour probability of an external token is 1.
        log_probs = [0.0] * len(token_ids) if request.get("sampling_params", {}).get("logprobs") else None
        # verl's staleness metrics read the weights version a server reports with each response.
        version = {key: self._weights_version for key in ("global_steps", "min_global_steps", "max_global_steps")}
        return TokenOutput(token_ids=token_ids, log_probs=log_probs, stop_reason="completed", num_preempted=0,
                           extra_fields=version)


def teacher_response_text(config: InjectConfig, messages: list[dict]) -> Callable[[list[Any]], Awaitable[str | None]]:
    """An async ``response_text(images)`` asking the teacher endpoint; None on any failure (logged)."""
    teacher = ChatCompletionsTeacher(config.teacher_url, config.teacher_model, retries=config.teacher_retries,
                                     timeout_s=config.teacher_timeout_s, backoff_s=0.5)
    sampling = SamplingSettings(temperature=config.teacher_temperature, max_new_tokens=config.teacher_max_tokens)

    async def response_text(images: list[Any]) -> str | None:
        request = GenerationRequest(messages=messages, images=images)
        try:
            texts = await asyncio.wait_for(asyncio.to_thread(teacher.generate, [request], sampling),
                                           timeout=config.teacher_timeout_s)
        except (BackendError, TimeoutError, OSError, ValueError) as err:
            logger.warning("karl inject: teacher %s gave no response (%s); sampling this rollout instead",
                           teacher.endpoint, err)
            return None
        return texts[0][0] if texts and texts[0] else None

    return response_text


class KarlInjectAgentLoop(SingleTurnAgentLoop):
    """``karl_inject_agent``: a sampled rollout, or for planned sessions an external response."""

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        sessions = int(kwargs.get(SESSIONS_FIELD) or 0)
        if not is_injected_session(int(kwargs.get("session_id", 0)), sessions):
            return with_flag(await super().run(sampling_params, **kwargs), False)
        config = InjectConfig.from_mapping(self.config.get("karl", {}).get("inject"))
        if config.source == "teacher":
            response_text = teacher_response_text(config, list(kwargs["raw_prompt"]))
        else:
            reference = str(kwargs.get(REFERENCE_FIELD) or "")

            async def response_text(images: list[Any]) -> str | None:
                return reference or None

        eos = self.tokenizer.eos_token_id
        vision = vision_tokens(self.tokenizer, self.processor)
        # The weights the group's sampled sessions run on: in sync training those synced at the end of
        # the previous step (the prompt's global_steps is the step it is trained in).
        step = kwargs.get("global_steps")
        version = max(int(step) - 1, 0) if step is not None else None
        server = ExternalResponseServer(self.server_manager, response_text,
                                        lambda text: response_token_ids(self.tokenizer, text, eos, vision), version)
        # A copy with the stand-in server: the instance verl built stays as it was.
        session = copy.copy(self)
        session.server_manager = server
        output = await SingleTurnAgentLoop.run(session, sampling_params, **kwargs)
        output.extra_fields[STATUS_KEY] = "injected" if server.injected else "fallback"
        return with_flag(output, server.injected)


def register() -> None:
    """Register :class:`KarlInjectAgentLoop` as verl's agent loop ``karl_inject_agent`` (idempotent)."""
    register_in_verl(NAME)(KarlInjectAgentLoop)


def is_registered() -> bool:
    target = _agent_loop_registry.get(NAME, {}).get("_target_")
    return target == f"{KarlInjectAgentLoop.__module__}.{KarlInjectAgentLoop.__qualname__}"


# Importing this module registers it, as verl's own decorator does (a dict entry, nothing more).
register()

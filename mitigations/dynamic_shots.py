"""Dynamic shots: choose the number of few-shot examples per request and retry on suspicion.

A request starts with a number of examples set by the policy. It is run again, with a
different number, when it looks corrupted. That is the case when a detector of another
mitigation fired for its row, when its logits were non-finite or beyond ``logit_bound``, or
when the caller's validator rejected the output. The rerun changes the prompt, so a transient fault is not replayed and a fault
that a particular prompt happens to trigger is avoided.

Two ways to use it:

* ``DynamicShots(examples=..., validator=...).run(model, tokenizer, query)`` builds prompts
  from the examples and the templates and owns the retry loop. The decision pieces
  (:meth:`build_prompt`, :meth:`initial_shots`, :meth:`next_shots`, :meth:`should_retry`)
  are public so a batched campaign can drive them itself.
* Installed by ``guard.protect``, it wraps ``generate`` on token ids. Without the prompt
  structure it cannot change the number of shots, so it reruns the same request when a
  detector fired or the logits were non-finite or out of range. No validator runs there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from guard.errors import ConfigError, unknown_choice
from guard.report import CORRECTING_ACTIONS, Detection
from mitigations.base import InstallHandle, Mitigation, MitigationConfig, register

logger = logging.getLogger(__name__)

POLICIES = ("fewest_first", "more_on_retry", "fewer_on_retry")
RETRY_ON = ("any", "uncorrected")


@dataclass
class DynamicShotsConfig(MitigationConfig):
    """Few-shot prompt construction and retry policy.

    ``examples``: ``(input, output)`` pairs, used in order. ``template``: the prompt, with
    ``{examples}`` and ``{query}`` placeholders. ``example_template``: one example, with
    ``{input}`` and ``{output}``. ``policy``: ``fewest_first`` starts at the smallest count in
    ``shots`` and adds examples on each retry. ``more_on_retry`` and ``fewer_on_retry`` start
    at ``start`` and move up or down through ``shots``. ``shots``: allowed counts (default
    0 to ``len(examples)``). ``max_retries``: reruns after the first attempt. ``logit_bound``:
    largest acceptable absolute logit (None: only non-finite logits trigger). ``retry_on``:
    ``any`` detection of another mitigation, or only ``uncorrected`` ones.
    """

    examples: Sequence[tuple[str, str]] = ()
    template: str = "{examples}{query}"
    example_template: str = "{input}\n{output}\n\n"
    validator: Callable[[str], bool] | None = None
    policy: str = "fewest_first"
    shots: Sequence[int] | None = None
    start: int | None = None
    max_retries: int = 2
    logit_bound: float | None = 1e4
    retry_on: str = "any"

    def __post_init__(self) -> None:
        examples = []
        for index, example in enumerate(self.examples):
            if (
                not isinstance(example, (tuple, list))
                or len(example) != 2
                or not all(isinstance(part, str) for part in example)
            ):
                raise ConfigError(
                    f"dynamic_shots.examples[{index}]={example!r} is not valid; each example "
                    "is an (input, output) pair of strings."
                )
            examples.append((example[0], example[1]))
        self.examples = tuple(examples)

        if not isinstance(self.template, str) or "{query}" not in self.template:
            raise ConfigError(
                f"dynamic_shots.template={self.template!r} must be a string containing '{{query}}' "
                "(and usually '{examples}')."
            )
        if not isinstance(self.example_template, str) or not (
            "{input}" in self.example_template and "{output}" in self.example_template
        ):
            raise ConfigError(
                f"dynamic_shots.example_template={self.example_template!r} must contain "
                "'{input}' and '{output}'."
            )
        if self.validator is not None and not callable(self.validator):
            raise ConfigError(
                f"dynamic_shots.validator={self.validator!r} is not callable; pass a function "
                "text -> bool or None."
            )
        if self.policy not in POLICIES:
            raise ConfigError(unknown_choice("dynamic_shots.policy", self.policy, POLICIES))
        if self.retry_on not in RETRY_ON:
            raise ConfigError(unknown_choice("dynamic_shots.retry_on", self.retry_on, RETRY_ON))

        limit = len(self.examples)
        shots = list(range(limit + 1)) if self.shots is None else list(self.shots)
        if not shots:
            raise ConfigError("dynamic_shots.shots is empty; give at least one number of examples.")
        for count in shots:
            if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= limit:
                raise ConfigError(
                    f"dynamic_shots.shots contains {count!r}; each count must be an integer from "
                    f"0 to the number of examples ({limit})."
                )
        self.shots = tuple(sorted(set(shots)))

        if self.start is not None and self.start not in self.shots:
            raise ConfigError(
                f"dynamic_shots.start={self.start!r} is not among shots={list(self.shots)}; "
                "pick one of them or leave it None."
            )
        if not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool) or self.max_retries < 0:
            raise ConfigError(f"dynamic_shots.max_retries={self.max_retries!r} must be an integer >= 0.")
        bound = self.logit_bound
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0):
            raise ConfigError(
                f"dynamic_shots.logit_bound={bound!r} must be a positive number or None."
            )


@dataclass
class ShotsResult:
    """Outcome of :meth:`DynamicShots.run`.

    ``tokens`` are the generated token ids (prompt excluded) of the accepted, or last,
    attempt. ``retry_reasons`` contains one reason per retry, in order.
    """

    text: str
    tokens: list[int]
    shots_used: int
    attempts: int
    retry_reasons: list[str] = field(default_factory=list)
    accepted: bool = True
    prompt: str = ""


@register
class DynamicShots(Mitigation):
    """Per-request number of few-shot examples, rerun when a request looks corrupted."""

    name = "dynamic_shots"
    order = 40
    Config = DynamicShotsConfig

    # ----- decision pieces --------------------------------------------------------------

    def initial_shots(self) -> int:
        """Return the number of examples of the first attempt."""
        shots = self.config.shots
        if self.config.policy == "fewest_first":
            return shots[0]
        if self.config.start is not None:
            return self.config.start
        return shots[0] if self.config.policy == "more_on_retry" else shots[-1]

    def next_shots(self, current: int, attempt: int) -> int:
        """Return the number of examples for retry ``attempt`` (1 = first retry) after ``current``.

        At the end of ``shots`` the count stays put, so the retry reruns the same prompt.
        """
        if attempt < 1:
            raise ConfigError(f"attempt={attempt!r} must be >= 1 (attempt 0 uses initial_shots()).")
        shots = self.config.shots
        if self.config.policy == "fewer_on_retry":
            smaller = [count for count in shots if count < current]
            return smaller[-1] if smaller else shots[0]
        larger = [count for count in shots if count > current]
        return larger[0] if larger else shots[-1]

    def build_prompt(self, query: str, n_shots: int) -> str:
        """Return the prompt for ``query`` with the first ``n_shots`` examples."""
        if not isinstance(n_shots, int) or not 0 <= n_shots <= len(self.config.examples):
            raise ConfigError(
                f"n_shots={n_shots!r} must be an integer from 0 to {len(self.config.examples)} "
                "(the number of examples)."
            )
        examples = "".join(
            self.config.example_template.format(input=example_input, output=example_output)
            for example_input, example_output in self.config.examples[:n_shots]
        )
        return self.config.template.format(examples=examples, query=query)

    def should_retry(
        self,
        text: str | None,
        detections: Sequence[Detection] = (),
        logits: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> str | None:
        """Return why a request should be retried, or None to accept it.

        ``detections`` are the detections of this request's row. ``logits`` are the logits it
        was generated from, one tensor or one per step. ``text`` is the decoded output for the
        validator, and None skips the validator.
        """
        for detection in detections:
            if detection.mitigation == self.name:
                continue
            if self.config.retry_on == "uncorrected" and detection.action in CORRECTING_ACTIONS:
                continue
            return f"detector:{detection.mitigation}/{detection.check}"
        reason = self._logits_reason(logits)
        if reason is not None:
            return reason
        if text is not None and self.config.validator is not None and not self.config.validator(text):
            return "validator"
        return None

    def _logits_reason(self, logits) -> str | None:
        if logits is None:
            return None
        tensors = [logits] if torch.is_tensor(logits) else list(logits)
        for tensor in tensors:
            if not bool(torch.isfinite(tensor).all()):
                return "nonfinite_logits"
            bound = self.config.logit_bound
            if bound is not None and tensor.numel() and float(tensor.abs().max()) > bound:
                return "logits_out_of_range"
        return None

    # ----- prompt-level driver ----------------------------------------------------------

    def run(self, model: nn.Module, tokenizer: Any, query: str, **generate_kwargs: Any) -> ShotsResult:
        """Generate a completion of ``query``, retrying with other shot counts when it looks corrupted.

        ``generate_kwargs`` go to ``model.generate`` (the model may be protected; its report's
        detections then count as detector signals). Return the accepted attempt, or the last
        one with ``accepted=False`` when every attempt was rejected.
        """
        if not callable(getattr(model, "generate", None)):
            raise ConfigError(f"dynamic_shots.run needs a model with generate, got {type(model).__name__}.")
        for reserved in ("input_ids", "return_dict_in_generate", "output_logits"):
            if reserved in generate_kwargs:
                raise ConfigError(
                    f"dynamic_shots.run sets {reserved} itself; remove it from the generate keywords."
                )
        device = next(model.parameters()).device
        shots = self.initial_shots()
        reasons: list[str] = []
        result: ShotsResult | None = None
        for attempt in range(self.config.max_retries + 1):
            if attempt > 0:
                shots = self.next_shots(shots, attempt)
            prompt = self.build_prompt(query, shots)
            encoded = tokenizer(prompt, return_tensors="pt").to(device)
            output = model.generate(
                **encoded, **generate_kwargs, return_dict_in_generate=True, output_logits=True
            )
            prompt_length = encoded["input_ids"].shape[1]
            tokens = output.sequences[0, prompt_length:].tolist()
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            logits = [step[0] for step in (output.logits or ())]
            reason = self.should_retry(text, _row_detections(model, row=0), logits)
            result = ShotsResult(text, tokens, shots, attempt + 1, list(reasons), reason is None, prompt)
            if reason is None:
                return result
            reasons.append(reason)
            logger.info("dynamic_shots retries %r (attempt %d): %s", query[:40], attempt + 1, reason)
        result.retry_reasons = reasons
        return result

    # ----- guard integration ------------------------------------------------------------

    def _install(self, model: nn.Module, context, handle: InstallHandle) -> None:
        self._flagged: dict[int, str] = {}
        # No prepend: the logits are checked as the caller receives them.
        handle.add_hook(model.register_forward_hook(self._check_logits))
        handle.add_cleanup(self._flagged.clear)

    def _check_logits(self, module: nn.Module, args: tuple, output: Any) -> None:
        context = self._context
        if context is None or not context.in_generate:
            return
        # This hook runs after the tracker's, so the pass that just ended is `finished`.
        info = context.tracker.finished
        if info is None or info.redundant:
            return
        logits = getattr(output, "logits", None)
        if logits is None:
            return
        with context.timed():
            last = logits[:, -1, :].detach()
            # One reduction per row: amax propagates NaN, and NaN fails the comparison.
            peak = last.abs().amax(-1)
            bound = self.config.logit_bound if self.config.logit_bound is not None else float("inf")
            bad = ~(peak <= bound)
            for row in torch.nonzero(bad).flatten().tolist():
                finite = bool(torch.isfinite(last[row]).all())
                reason = "logits_out_of_range" if finite else "nonfinite_logits"
                self._flagged.setdefault(row, f"{reason} at step {info.index}")

    def before_generate(self, context, args: tuple, kwargs: dict) -> None:
        self._flagged.clear()

    def _flagged_rows(self, context) -> dict[int | None, str]:
        rows: dict[int | None, str] = dict(self._flagged)
        for detection in context.call.detections:
            if detection.attempt != context.attempt or detection.mitigation == self.name:
                continue
            reason = self.should_retry(None, [detection])
            if reason is not None:
                rows.setdefault(detection.row, reason)
        return rows

    def around_generate(self, context, call_next, args: tuple, kwargs: dict) -> Any:
        output, error = self._attempt(call_next, args, kwargs)
        # Rows whose returned value came from the latest attempt (None: every row).
        current: set[int] | None = None
        for retry in range(1, self.config.max_retries + 1):
            flagged = _restrict(self._flagged_rows(context), current)
            if not flagged:
                return output
            self._record(context, flagged, "rerun", f"rerun {retry} of the request")
            context.attempt = retry
            context.call.attempts = retry + 1
            with context.timed():
                # NOTE: the whole batch reruns with the same inputs, and a streamer receives
                # the rerun's tokens again.
                rerun, error = self._attempt(call_next, args, kwargs)
                if rerun is None or output is None:
                    output, current = rerun, None
                else:
                    output, current = _merge_rows(output, rerun, set(flagged), _pad_id(context.model, kwargs))
        flagged = _restrict(self._flagged_rows(context), current)
        if flagged:
            self._record(context, flagged, "none", "retries exhausted; the last attempt is returned")
        if output is None:
            raise error
        return output

    def _attempt(self, call_next, args: tuple, kwargs: dict) -> tuple[Any, RuntimeError | None]:
        """Run one attempt; a RuntimeError after non-finite logits (a sampling crash) becomes a retry."""
        try:
            return call_next(*args, **kwargs), None
        except RuntimeError as error:
            if not self._flagged:
                raise
            logger.warning("dynamic_shots: generate failed after flagged logits (%s); rerunning", error)
            return None, error

    def _record(self, context, flagged: dict[int | None, str], action: str, detail: str) -> None:
        for row, reason in sorted(flagged.items(), key=lambda item: (item[0] is None, item[0] or 0)):
            context.record(Detection(
                mitigation=self.name, check="retry", action=action, row=row,
                detail=f"{reason}; {detail}",
            ))


def _restrict(flagged: dict[int | None, str], rows: set[int] | None) -> dict[int | None, str]:
    """Keep the flags of ``rows`` (all when None) and whole-batch flags."""
    if rows is None:
        return flagged
    return {row: reason for row, reason in flagged.items() if row is None or row in rows}


def _pad_id(model: nn.Module, kwargs: dict) -> int:
    config = getattr(model, "generation_config", None)
    for candidate in (kwargs.get("pad_token_id"), getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if isinstance(candidate, int):
            return candidate
    return 0


def _merge_rows(previous: Any, rerun: Any, rows: set[int | None], pad_id: int) -> tuple[Any, set[int] | None]:
    """Take ``rows`` from ``rerun`` and the other rows from ``previous``.

    Return the merged output and the rows that now come from ``rerun`` (None for all). Only
    plain token tensors are merged row by row, so sampled rows without a fault keep their
    samples. Dict outputs (``return_dict_in_generate``) and whole-batch flags take the rerun
    whole.
    """
    if None in rows or not (torch.is_tensor(previous) and torch.is_tensor(rerun)) or previous.dim() != 2:
        return rerun, None
    length = max(previous.shape[1], rerun.shape[1])
    merged = torch.full((previous.shape[0], length), pad_id, dtype=previous.dtype, device=previous.device)
    merged[:, : previous.shape[1]] = previous
    for row in rows:
        merged[row] = pad_id
        merged[row, : rerun.shape[1]] = rerun[row]
    if length > previous.shape[1] and not (merged[:, previous.shape[1]:] != pad_id).any():
        merged = merged[:, : previous.shape[1]]
    return merged, {row for row in rows if row is not None}


def _row_detections(model: nn.Module, row: int) -> list[Detection]:
    """Return the last guarded call's detections for ``row`` (and whole-batch ones), if protected."""
    from guard.protect import _REPORTS, is_protected  # guard imports mitigations at load time

    if not is_protected(model):
        return []
    report = _REPORTS.get(model)
    call = report.last_call if report is not None else None
    if call is None:
        return []
    return [d for d in call.detections if d.row in (row, None)]

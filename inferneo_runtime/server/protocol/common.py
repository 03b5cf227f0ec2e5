"""What every request shares: the field error, the base model (unknown fields logged), sampling fields."""
from __future__ import annotations

import logging
import re
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...errors import RequestError
from ...sampling import MAX_LOGPROBS, SamplingParams


logger = logging.getLogger("inferneo.server")

# OpenAI's defaults where a request leaves a sampling field unset.
API_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MODEL_HELP = ("a model name (its newest version), name@version, or an A/B test's name; omitted or \"auto\": "
              "routed by the server's routing rules (OpenAI requires it; Inferneo extension: optional)")
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class ParamError(RequestError):
    """A request error about one field, which the error response names in `param`."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param = param
        self.code = code


MAX_MESSAGES = 100_000  # a hard bound checked before the messages are validated (max_messages is the setting)
ShortText = Annotated[str, Field(max_length=256)]  # roles, names, types, ids: never long


class OpenAIBaseModel(BaseModel):
    """Accepts unknown fields and logs them (once per request) instead of failing. Floats must be finite
    (Infinity and NaN are 400s naming the field)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _log_unknown_fields(self):
        if self.model_extra:  # names are the client's: quoted and capped, so they cannot forge log lines
            names = sorted(self.model_extra)
            shown = ", ".join(repr(n[:40]) for n in names[:8])
            shown += f" and {len(names) - 8} more" if len(names) > 8 else ""
            logger.warning("%s: ignoring unknown field(s): %s", type(self).__name__, shown)
        return self


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class _SamplingExtensions(BaseModel):
    """Inferneo extensions, shared by both endpoints. Listed first among a request's bases, so pydantic
    orders these fields after the OpenAI ones."""

    model_config = ConfigDict(allow_inf_nan=False)

    # --- Inferneo extensions (not in OpenAI's API) -------------------------------------------------
    top_k: Optional[int] = Field(None, ge=-1, description="sample from the k most likely tokens (0 or -1: all)")
    min_p: Optional[float] = Field(None, ge=0, le=1, description="drop tokens below min_p x the top probability")
    repetition_penalty: Optional[float] = Field(None, gt=0, description="transformers' rule over prompt + output; "
                                                                        "1 = off")
    min_tokens: int = Field(0, ge=0, description="generate at least this many tokens before EOS or stop tokens")
    ignore_eos: bool = Field(False, description="keep generating past the EOS token")
    stop_token_ids: Optional[list[TokenId]] = Field(None, description="token ids that end generation, like EOS")
    speculative_tokens: Optional[int] = Field(None, ge=0, le=16, description="tokens drafted per step by speculative "
                                              "decoding (0: off; unset: the server's setting); output is unchanged")
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="vLLM's: the logprob of each "
                                           "prompt token given those before it, with this many top alternatives "
                                           "(not with stream)")
    include_stop_str_in_output: bool = Field(False, description="keep the stop string that ended the text in it")
    skip_special_tokens: bool = Field(True, description="leave special tokens out of the output text")
    # structured outputs (vLLM's names; structured.py): at most one of these, or chat's response_format
    guided_json: Optional[Union[dict[str, Any], str]] = Field(None, description="a JSON schema the output must match")
    guided_regex: Optional[str] = Field(None, max_length=10_000, description="a regex the output must fullmatch")
    guided_choice: Optional[list[str]] = Field(None, max_length=1024, description="the output is one of these")
    guided_grammar: Optional[str] = Field(None, max_length=100_000, description="a Lark grammar for the output")
    # --- end of extensions -------------------------------------------------------------------------


class _Sampling:
    """What both request types share: reading fields with request > server default > API default."""

    def _value(self, name: str, defaults: dict):
        value = getattr(self, name)
        if value is None:
            value = defaults.get(name, API_DEFAULTS.get(name))
        return value

    def _stops(self) -> tuple[str, ...]:
        stop = self.stop
        return () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)

    def _sampling_params(self, max_tokens: int, logprobs: Optional[int], defaults: Optional[dict],
                         seed_offset: int, constraint=None, prompt_logprobs: Optional[int] = None) -> SamplingParams:
        defaults = defaults or {}
        if self.prompt_logprobs is not None and self.stream:  # as vLLM: they come whole, with the response
            raise ParamError("prompt_logprobs is not available with stream: true", param="prompt_logprobs")
        seed = self.seed if self.seed is None else self.seed + seed_offset
        return SamplingParams(
            max_new_tokens=max_tokens, min_new_tokens=min(self.min_tokens, max_tokens),
            temperature=self._value("temperature", defaults), top_k=self._value("top_k", defaults),
            top_p=self._value("top_p", defaults), min_p=self._value("min_p", defaults),
            repetition_penalty=self._value("repetition_penalty", defaults),
            presence_penalty=self._value("presence_penalty", defaults),
            frequency_penalty=self._value("frequency_penalty", defaults),
            seed=seed, stop=self._stops(), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, logprobs=logprobs, speculative_tokens=self.speculative_tokens,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            logit_bias=self._logit_bias(), include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            constraint=constraint or self._constraint())

    def _logit_bias(self) -> tuple[tuple[int, float], ...]:
        """OpenAI's logit_bias: {"token id": bias in [-100, 100]}. (The vocabulary bound is checked with the model.)"""
        out = []
        for key, bias in (self.logit_bias or {}).items():
            if not re.fullmatch(r"\s*[0-9]{1,10}\s*", key) or int(key) > 2**31 - 1:
                raise ParamError(f"logit_bias: {key[:40]!r} is not a token id (a non-negative integer)",
                                 param="logit_bias")
            if not -100 <= bias <= 100:
                raise ParamError(f"logit_bias: the bias of token {key} is {bias}; it must be in [-100, 100]",
                                 param="logit_bias")
            out.append((int(key), float(bias)))
        return tuple(out)

    def _constraint(self):
        """Structured outputs: response_format (chat) or guided_* as a structured.Constraint (None: free text)."""
        from ...structured import ConstraintError, make_constraint

        try:
            return make_constraint(getattr(self, "response_format", None), self.guided_json, self.guided_regex,
                                   self.guided_choice, self.guided_grammar)
        except ConstraintError as e:
            raise ParamError(str(e), param=e.param) from None

    def _reject_unsupported(self, checks: dict[str, bool]) -> None:
        for name, bad in checks.items():
            if bad:
                raise ParamError(f"{name}: not supported by this server", param=name.split()[0])

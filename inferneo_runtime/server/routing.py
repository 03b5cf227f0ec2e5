"""Routing rules and A/B tests: which model answers a request that does not name one.

A request that names a model (`"model": "qwen"` or `"qwen@2"`) goes to it: explicit names bypass routing.
A request without a model (or with `"model": "auto"`) is routed: the rules are tried by priority (highest
first, then in the order they were added) and the first whose condition holds picks the target; without a
match the target is `default_model`, else the server's only model. A target (or an explicit `model`) that
names an A/B test is split between the test's two models: `traffic_split` of the callers go to model_b,
decided by a hash of the test's name and the caller's key (`user`, else the X-User-ID or X-Request-ID header),
so a caller stays on one arm. Each arm counts requests, errors, tokens and latency (GET /v1/ab_tests/NAME,
and Prometheus `inferneo_ab_*`).

Conditions (strings, or mappings with the same parts):
    prompt contains 'code'        case-insensitive substring of the prompt (chat: every message's text)
    prompt matches '^def \\w+'    a regular expression (re.search)
    prompt startswith 'SELECT'
    header x-team == 'ml'         a request header (names are case-insensitive); also contains / !=
    user == 'bob'                 the request's `user` field
    {field: header, header: x-team, op: equals, value: ml}
"""
from __future__ import annotations

import hashlib
import logging
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import Mapping, Optional

from ..errors import RequestError

AUTO_MODELS = ("", "auto", "default")
OPS = {"contains": "contains", "matches": "matches", "==": "equals", "equals": "equals", "!=": "not_equals",
       "not_equals": "not_equals", "startswith": "startswith"}
logger = logging.getLogger("inferneo.server")
REGEX_TIMEOUT_S = 0.1  # longest a routing rule's regular expression may search one request
_CONDITION = re.compile(r"^\s*(?P<field>prompt|user|header\s+(?P<header>[A-Za-z0-9_-]+))\s+"
                        r"(?P<op>contains|matches|startswith|==|!=)\s+(?P<q>['\"])(?P<value>.*)(?P=q)\s*$", re.S)


class RoutingError(RequestError):
    """A routing rule or A/B test is invalid, or a request cannot be routed."""

    def __init__(self, message: str, code: str = "invalid_routing", param: Optional[str] = None):
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass(frozen=True)
class RouteContext:
    prompt: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    user: Optional[str] = None


@dataclass
class Condition:
    field: str  # prompt | user | header
    op: str  # contains | matches | equals | not_equals | startswith
    value: str
    header: Optional[str] = None
    _regex: Optional[object] = None  # a compiled `regex` pattern

    @classmethod
    def parse(cls, spec) -> "Condition":
        if isinstance(spec, Condition):
            return spec
        if isinstance(spec, str):
            m = _CONDITION.match(spec)
            if not m:
                raise RoutingError(f"condition {spec!r}: expected e.g. \"prompt contains 'code'\", "
                                   f"\"header x-team == 'ml'\" or \"user == 'bob'\"")
            fld = "header" if m["header"] else m["field"]
            spec = {"field": fld, "header": m["header"], "op": m["op"], "value": m["value"]}
        if not isinstance(spec, Mapping):
            raise RoutingError(f"condition {spec!r}: a string or a mapping (field, op, value)")
        unknown = set(spec) - {"field", "header", "op", "value"}
        if unknown:
            raise RoutingError(f"condition: unknown key(s) {', '.join(sorted(unknown))}; "
                               f"keys: field, header, op, value")
        fld, op, value = spec.get("field"), OPS.get(str(spec.get("op"))), spec.get("value")
        if fld not in ("prompt", "user", "header"):
            raise RoutingError(f"condition field {fld!r}: one of prompt, user, header")
        if op is None:
            raise RoutingError(f"condition op {spec.get('op')!r}: one of contains, matches, startswith, ==, !=")
        if not isinstance(value, str):
            raise RoutingError("condition value: a string")
        header = spec.get("header")
        if fld == "header" and not (isinstance(header, str) and header):
            raise RoutingError("condition on a header: name the header (header: x-team)")
        c = cls(fld, op, value, header.lower() if fld == "header" else None)
        if op == "matches":
            import regex  # the `regex` engine: a search takes a timeout (re's cannot), so (a|aa)+$ cannot stall

            try:
                c._regex = regex.compile(value)
            except regex.error as e:
                raise RoutingError(f"condition regular expression {value!r}: {e}") from None
        return c

    def matches(self, ctx: RouteContext) -> bool:
        if self.field == "prompt":
            subject = ctx.prompt
        elif self.field == "user":
            subject = ctx.user
        else:
            subject = ctx.headers.get(self.header)
        if subject is None:
            return self.op == "not_equals"
        if self.op == "contains":
            return self.value.lower() in subject.lower()
        if self.op == "matches":
            try:
                return self._regex.search(subject, timeout=REGEX_TIMEOUT_S, concurrent=True) is not None  # GIL freed
            except TimeoutError:
                logger.warning("routing rule regular expression %r gave up after %.2fs on a %d-character subject; "
                               "treated as no match", self.value[:100], REGEX_TIMEOUT_S, len(subject))
                return False
        if self.op == "startswith":
            return subject.startswith(self.value)
        if self.op == "equals":
            return subject == self.value
        return subject != self.value

    def describe(self) -> str:
        subject = f"header {self.header}" if self.field == "header" else self.field
        op = {"equals": "==", "not_equals": "!="}.get(self.op, self.op)
        return f"{subject} {op} {self.value!r}"


@dataclass
class RoutingRule:
    name: str
    condition: Condition
    model: str
    priority: int = 0
    order: int = 0
    hits: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, "condition": self.condition.describe(), "model": self.model,
                "priority": self.priority, "hits": self.hits}


@dataclass
class ArmStats:
    model: str
    requests: int = 0
    errors: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float = 0.0
    ttft_n: int = 0

    def to_dict(self) -> dict:
        ok = self.requests - self.errors
        return {"model": self.model, "requests": self.requests, "errors": self.errors,
                "completion_tokens": self.completion_tokens,
                "mean_latency_s": self.latency_s / ok if ok else None,
                "mean_ttft_s": self.ttft_s / self.ttft_n if self.ttft_n else None}


@dataclass
class ABTest:
    name: str
    model_a: str
    model_b: str
    traffic_split: float = 0.5  # share of callers sent to model_b
    sticky: str = "user"
    arms: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 0 <= self.traffic_split <= 1:
            raise RoutingError(f"A/B test {self.name!r}: traffic_split {self.traffic_split} must be in [0, 1]")
        if self.sticky not in ("user", "request_id"):
            raise RoutingError(f"A/B test {self.name!r}: sticky {self.sticky!r} is user or request_id")
        self.arms = {"a": ArmStats(self.model_a), "b": ArmStats(self.model_b)}

    def bucket(self, key: str) -> float:
        """The caller's place in [0, 1): a hash of the test and the key, so the same caller lands the same way."""
        digest = hashlib.sha256(f"{self.name}\0{key}".encode("utf-8", "surrogatepass")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0 ** 64

    def choose(self, key: str) -> tuple[str, str]:
        arm = "b" if self.bucket(key) < self.traffic_split else "a"
        return arm, self.model_b if arm == "b" else self.model_a

    def key_of(self, ctx: RouteContext) -> str:
        if self.sticky == "user":
            key = ctx.user or ctx.headers.get("x-user-id") or ctx.headers.get("x-request-id")
        else:
            key = ctx.headers.get("x-request-id") or ctx.user
        return key or uuid.uuid4().hex  # no key: each request on its own

    def to_dict(self) -> dict:
        return {"name": self.name, "model_a": self.model_a, "model_b": self.model_b,
                "traffic_split": self.traffic_split, "sticky": self.sticky,
                "arms": {arm: s.to_dict() for arm, s in self.arms.items()}}


@dataclass(frozen=True)
class Route:
    model: str  # what to ask the registry for
    rule: Optional[str] = None  # the rule that matched
    ab_test: Optional[str] = None
    arm: Optional[str] = None
    explicit: bool = False

    def describe(self) -> str:
        parts = ["explicit" if self.explicit else f"rule:{self.rule}" if self.rule else "default"]
        if self.ab_test:
            parts.append(f"ab:{self.ab_test}:{self.arm}")
        return ",".join(parts)


class Router:
    def __init__(self, config=None):
        self._lock = threading.Lock()
        self.rules: dict[str, RoutingRule] = {}
        self.ab_tests: dict[str, ABTest] = {}
        self.default_model: Optional[str] = None
        self._order = 0
        if config is not None:
            self.default_model = config.default_model
            for r in config.rules:
                self.add_rule(r.name, r.condition, r.model, r.priority)
            for t in config.ab_tests:
                self.add_ab_test(t.name, t.model_a, t.model_b, t.traffic_split, t.sticky)

    # -- changes ------------------------------------------------------------------------------------
    def add_rule(self, name: str, condition, model: str, priority: int = 0) -> RoutingRule:
        rule = RoutingRule(name, Condition.parse(condition), model, int(priority))
        with self._lock:
            if name in self.rules:
                raise RoutingError(f"routing rule {name!r} already exists; delete it first", code="conflict")
            self._order += 1
            rule.order = self._order
            self.rules[name] = rule
        return rule

    def remove_rule(self, name: str) -> None:
        with self._lock:
            if self.rules.pop(name, None) is None:
                raise RoutingError(f"no routing rule {name!r}; rules: {', '.join(self.rules) or 'none'}",
                                   code="not_found")

    def add_ab_test(self, name: str, model_a: str, model_b: str, traffic_split: float = 0.5,
                    sticky: str = "user") -> ABTest:
        test = ABTest(name, model_a, model_b, float(traffic_split), sticky)
        with self._lock:
            if name in self.ab_tests:
                raise RoutingError(f"A/B test {name!r} already exists; delete it first", code="conflict")
            self.ab_tests[name] = test
        return test

    def remove_ab_test(self, name: str) -> None:
        with self._lock:
            if self.ab_tests.pop(name, None) is None:
                raise RoutingError(f"no A/B test {name!r}; tests: {', '.join(self.ab_tests) or 'none'}",
                                   code="not_found")

    def to_dict(self) -> dict:
        with self._lock:
            rules = sorted(self.rules.values(), key=lambda r: (-r.priority, r.order))
            return {"default_model": self.default_model, "rules": [r.to_dict() for r in rules],
                    "ab_tests": [t.to_dict() for t in self.ab_tests.values()]}

    # -- requests -----------------------------------------------------------------------------------
    def route(self, requested: Optional[str], ctx: RouteContext, models: list[str]) -> Route:
        """Where a request goes. `models` are the registered names (for the only-model default)."""
        if requested is not None and requested.strip().lower() not in AUTO_MODELS:
            test = self.ab_tests.get(requested)
            if test is None:
                return Route(requested, explicit=True)
            arm, model = test.choose(test.key_of(ctx))
            return Route(model, ab_test=test.name, arm=arm, explicit=True)
        with self._lock:
            rules = sorted(self.rules.values(), key=lambda r: (-r.priority, r.order))
        rule = next((r for r in rules if r.condition.matches(ctx)), None)
        if rule is not None:
            rule.hits += 1
            target, rule_name = rule.model, rule.name
        else:
            rule_name = None
            target = self.default_model or (models[0] if len(set(models)) == 1 else None)
            if target is None:
                raise RoutingError(f"the request names no model and no routing rule matched; name one of: "
                                   f"{', '.join(models) or 'none'}", code="model_required", param="model")
        test = self.ab_tests.get(target)
        if test is None:
            return Route(target, rule=rule_name)
        arm, model = test.choose(test.key_of(ctx))
        return Route(model, rule=rule_name, ab_test=test.name, arm=arm)

    def record(self, route: Route, ok: bool, latency_s: float, ttft_s: Optional[float], tokens: int) -> None:
        """Count a finished request against its A/B arm."""
        test = self.ab_tests.get(route.ab_test) if route.ab_test else None
        if test is None:
            return
        with self._lock:
            s = test.arms[route.arm]
            s.requests += 1
            if ok:
                s.latency_s += latency_s
                s.completion_tokens += tokens
                if ttft_s is not None:
                    s.ttft_s += ttft_s
                    s.ttft_n += 1
            else:
                s.errors += 1

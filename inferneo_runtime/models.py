"""Custom model classes: bring your own generation code, served like a built-in backend.

    # my_models.py
    from inferneo_runtime.models import CustomModel

    class Echo(CustomModel):
        model_name = "echo"                      # the served name (default: --model's folder, else the class)

        def load(self):                          # once, when the registry loads the model (self.path, self.options)
            self.prefix = "echo: "

        def generate(self, prompt, params):      # params: inferneo_runtime.SamplingParams
            return (self.prefix + prompt)[: params.max_new_tokens]

    $ inferneo serve --model-class my_models:Echo --model path/to/its/files

`generate(prompt, params) -> str` is the one method to write. `stream(prompt, params)` yields text pieces and
defaults to one piece, the whole of `generate`; override it to stream. Chat requests are rendered to a prompt
by `chat_prompt(messages)` ("role: content" lines, then "assistant:"); override it for a real template. The
class honours `params` itself (max_new_tokens, stop, temperature, seed). The server counts characters as
tokens for the context check and usage (`max_context` characters), and each piece a stream yields as one
completion token; `max_concurrency` requests run at once (threads), more wait their turn. `estimate_bytes`
(classmethod) and `memory_bytes` feed the registry's memory budget; `close()` frees what `load()` took.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Sequence

from .errors import RequestError
from .drivers import Cancelled, DriverStopped, Ticket
from .generation import TokenEvent
from .sampling import SamplingParams

logger = logging.getLogger("inferneo.server")


class CustomModel:
    """Base class for --model-class. Subclasses write `generate` (and optionally `load`, `stream`, `close`)."""

    model_name: Optional[str] = None  # served name when neither the config nor --model gives one
    max_context: int = 4096  # characters of prompt + output a request may use
    max_concurrency: int = 4  # requests generated at once (each on its own thread)
    format: str = "custom"  # shown in the model info

    def __init__(self, path: str, **options):
        self.path = path
        self.options = options

    @classmethod
    def estimate_bytes(cls, path: str) -> int:
        """Memory the model will take once loaded (for the registry's budget); 0 = unknown."""
        return 0

    def load(self) -> None:
        """Load weights etc. Called once, on the registry's load (at startup, or first use with lazy loading)."""

    def close(self) -> None:
        """Free what `load` took; called on unload, eviction and shutdown."""

    def memory_bytes(self) -> int:
        return 0

    def generate(self, prompt: str, params: SamplingParams) -> str:
        raise NotImplementedError(f"{type(self).__name__} must implement generate(prompt, params) -> str")

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        yield self.generate(prompt, params)

    def chat_prompt(self, messages: list[dict]) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def info(self) -> dict:
        """Extra fields for GET /v1/models/{id}."""
        return {}


class TextCodec:
    """The server's tokenizer interface over plain text: one id per character (what custom models count)."""

    eos_id = None
    bos_id = None

    def __init__(self, model: CustomModel):
        self._model = model

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if 0 <= i < 0x110000)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self._model.chat_prompt(messages))


class CustomHost:
    """A loaded CustomModel as the registry and server see a model: tokenizer, close, memory."""

    manifest = None
    vocab_size = 0x110000

    def __init__(self, model: CustomModel, class_path: str):
        self.impl = model
        self.class_path = class_path
        self.tokenizer = TextCodec(model)
        self.name = model.model_name or type(model).__name__

    def close(self) -> None:
        self.impl.close()

    def memory(self) -> dict:
        return {"device": "custom", "weights_bytes": int(self.impl.memory_bytes())}


class CustomDriver:
    """EngineDriver's interface over a CustomModel: each request runs `stream` on a worker thread."""

    cache_bytes = 0

    def __init__(self, name: str, host: CustomHost):
        self.name = name
        self.host = host
        model = host.impl
        self.max_sequence = int(model.max_context)
        self.max_batch = int(model.max_concurrency)
        self.in_flight = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._pool = ThreadPoolExecutor(self.max_batch, thread_name_prefix=f"inferneo-custom-{name}")

    @property
    def idle(self) -> bool:
        return self.in_flight == 0

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if params.logprobs is not None:
            raise RequestError(f"logprobs are not available from custom model {self.name!r}")
        if params.constraint is not None:  # a custom model's generate() never sees the grammar's mask
            raise RequestError(f"structured outputs (response_format, guided_*) are not available from custom model "
                               f"{self.name!r}")
        if len(prompt_ids) + params.max_new_tokens > self.max_sequence:
            raise RequestError(f"prompt of {len(prompt_ids)} characters + max_tokens {params.max_new_tokens} exceeds "
                               f"custom model {self.name!r}'s max_context {self.max_sequence}")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink) -> Ticket:
        ticket = Ticket(prompt_ids, params, sink)
        with self._lock:
            if self._stopping:
                raise DriverStopped(f"model {self.name!r} is shutting down")
            self.in_flight += 1
        self._pool.submit(self._run, ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        ticket.cancelled = True

    def _run(self, ticket: Ticket) -> None:
        item = None
        try:
            prompt = self.host.tokenizer.decode(ticket.prompt_ids)
            held = None  # each piece is sent when the next arrives, so the last one carries the finish reason
            for piece in self.host.impl.stream(prompt, ticket.params):
                if ticket.cancelled:
                    item = Cancelled()
                    break
                if piece:
                    if held is not None:
                        self._send(ticket, TokenEvent(0, 0, held, None))
                    held = str(piece)
            else:
                item = TokenEvent(0, 0, held or "", "stop")
        except Exception as e:  # noqa: BLE001 - the request's error goes back to its client; the server stays up
            logger.error("custom model %s: generation failed: %s", self.name, e)
            item = e
        with self._lock:
            ticket.done = True
            self.in_flight -= 1
        self._send(ticket, item)

    def _send(self, ticket: Ticket, item) -> None:
        try:
            ticket.sink(item)
        except Exception as e:  # noqa: BLE001 - e.g. the event loop already closed at shutdown
            logger.debug("custom model %s: dropping an event: %s", self.name, e)

    def stop(self, timeout: Optional[float] = None) -> bool:
        with self._lock:
            self._stopping = True
        self._pool.shutdown(wait=timeout is None or timeout > 0)
        return True

"""LlamaCppLanguageModel: a language model run in this process, behind the LanguageModel
Protocol, on llama.cpp's own server engine (the ``xllamacpp`` package, prebuilt).

I/O layer. ``start()`` gets the verified model file (``pipeline.local_llm_file``), loads it
into one server object that this provider owns, and warms it: the system prompt and the tools'
definitions are the start of every request, so computing them once leaves them in the KV cache
and each answer only reads the conversation's new tokens (first token in ~0.3 s instead of
several seconds). ``aclose()`` stops any answer still running and frees the server.

While the user speaks, ``warm(messages, tools)`` reads the request's start (the conversation
and the user's words so far) into the same cache, so at the turn's end only the last words and
the assistant's header are left to read (measured: 7-9 tokens instead of 11-13, ~40 ms each on
2 cores). One warm-up at a time, at most every ``WARM_EVERY_S``, none while an answer runs.
Once an answer is written, the same kind of read takes the next turn's start (the answer as
the conversation keeps it, and the user message's header), while the answer still plays.

Each answer runs the server's blocking streaming call in a thread of the provider's own pool;
the tokens cross to the event loop through a queue. Closing or abandoning the iterator (a
barge-in) sets a flag the next token's callback returns, which makes llama.cpp stop generating
and free its slot.

The server also answers HTTP on a loopback port (it always does): a random API key, never
given out, keeps that door shut.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncGenerator, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import LocalLlmConfig, usable_cores
from pipeline.local_agent import reply_pieces
from pipeline.local_llm_chat import (
    ToolCallGate,
    bare_tools,
    chat_messages,
    chat_tools,
    holds_facts,
    parse_tool_calls,
    recent_history,
    settled_call,
    system_prompt,
    time_answer,
    time_call,
)
from pipeline.local_llm_file import cached_model, default_cache_dir
from pipeline.providers import (
    ForcedTool,
    LanguageModelEvent,
    Message,
    ProviderError,
    TextDelta,
    ToolCall,
    ToolChoice,
    ToolSpec,
    Usage,
)

log = logging.getLogger(__name__)
CANNOT_DO = "Sorry, I cannot do that."
NO_ANSWER = "Sorry, I have no answer to that."
WARM_EVERY_S = 0.25  # a warm-up starts at most this often (partial transcripts come faster)


@dataclass(frozen=True)
class PromptTokens:
    """How an answer's prompt was read: ``cached`` tokens came from the KV cache (the system
    prompt, the tools, the conversation so far), ``computed`` ones were new."""

    cached: int = 0
    computed: int = 0


@dataclass(eq=False)
class _Answer:
    """One generation's crossing from the server's thread to the event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: PromptTokens | None = None
    settled: bool = False  # stopped once its call was settled (local_llm_chat.settled_call)

    def on_chunk(self, chunk: dict[str, Any]) -> bool:
        """The server's callback, on its thread: True stops the generation."""
        if not self.stop.is_set():
            self._hand_over(chunk)
        return self.stop.is_set()

    def done(self) -> None:
        self._hand_over(None)

    def _hand_over(self, chunk: dict[str, Any] | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, chunk)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.stop.set()


@dataclass(eq=False)
class _WarmUp:
    """One warm-up read: its thread's future, its stop flag and what it read."""

    stop: threading.Event = field(default_factory=threading.Event)
    done: Future[None] = field(default_factory=Future)  # the pool's, once submitted
    prompt_tokens: PromptTokens | None = None

    def on_chunk(self, chunk: dict[str, Any]) -> bool:
        if "error" in chunk:  # (no answer depends on it: logged, not raised)
            log.warning("local model: a warm-up failed: %s", chunk["error"].get("message", chunk))
        self.prompt_tokens = _prompt_tokens(chunk) or self.prompt_tokens
        return self.stop.is_set()


class LlamaCppLanguageModel:
    name = "local-llm/qwen2.5-coder-1.5b"

    def __init__(
        self,
        config: LocalLlmConfig,
        *,
        topics: Sequence[str] = (),
        facts: Sequence[str] = (),
        warm_tools: Sequence[ToolSpec] = (),
        model_path: Path | None = None,
    ) -> None:
        self.config = config
        self._system = system_prompt(topics, facts)
        # with the knowledge file in the prompt, looking it up adds nothing
        self._known_tools = frozenset({"lookup_knowledge"} if holds_facts(facts) else ())
        self._warm_tools = tuple(warm_tools)
        self._model_path = model_path
        self._server: Any = None
        self._threads = ThreadPoolExecutor(config.parallel + 1, thread_name_prefix="local-llm")
        self._answers: set[_Answer] = set()
        self.last_prompt_tokens = PromptTokens()
        self._warm_up: _WarmUp | None = None
        self._warmed_at_s = -WARM_EVERY_S
        self._warmed_request: dict[str, Any] | None = None
        self.warm_ups = 0  # started
        self.header_reads = 0  # next turns' headers read after an answer (_read_next_header)
        self.last_warm_tokens = PromptTokens()  # how the last finished warm-up read its prompt
        self.settled_calls = 0  # calls taken before the model finished writing them
        self.time_answers = 0  # time turns worded from the tool's result, not by the model

    async def start(self) -> None:
        path = self._model_path
        if path is None:
            cache_dir = Path(self.config.cache_dir or default_cache_dir())
            path = await asyncio.to_thread(cached_model, cache_dir)
        loop = asyncio.get_running_loop()
        self._server = await loop.run_in_executor(self._threads, _load_server, path, self.config)
        await self._warm()

    async def aclose(self) -> None:
        for answer in self._answers:
            answer.stop.set()
        if self._warm_up is not None:
            self._warm_up.stop.set()
        held, self._server = [self._server], None
        await asyncio.to_thread(self._threads.shutdown, wait=True)
        # Freed off the loop: the server's threads end when it is (under a second, GIL held).
        await asyncio.to_thread(_free, held)

    async def _warm(self) -> None:
        """The fixed start of every request, computed once into the KV cache."""
        warm = [Message("user", "Hello.")]
        async for _ in self._answer(warm, self._warm_tools, "auto", 1):
            pass  # (not generate: no turn follows this one, so no header is read after it)

    def warm(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> None:
        """Read ``messages`` and ``tools`` (a request's, with the user's words so far) into the KV
        cache, writing nothing; returns at once. Skipped while an answer runs (a turn's answer
        never waits behind a warm-up it did not need) or a warm-up does, within
        ``WARM_EVERY_S`` of the last one, for the prompt read last, and when the configuration
        says not to (``read_ahead``)."""
        if not self.config.read_ahead or self._server is None or self._answers or self.warming:
            return
        now_s = time.monotonic()
        if now_s - self._warmed_at_s < WARM_EVERY_S:
            return
        request = self._prompt_only(messages, tools)
        if self._warmed_request == request:
            return
        self._warmed_at_s, self._warmed_request = now_s, request
        self.warm_ups += 1
        self._start_warm_up(request)

    def _read_next_header(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], text: str
    ) -> None:
        """After an answer read to its end: the conversation as the next turn will send it (this
        answer as written, then the user's header, "<|im_end|>\n<|im_start|>user\n") read into
        the KV cache while the answer plays, so the next turn reads only its words and the
        assistant's header (a five-word question: 10 new tokens, not 15). Nothing after a tool
        call (the next round follows at once), while an answer or a warm-up runs, or when the
        configuration says not to (``read_next_header``)."""
        if not self.config.read_next_header or not text.strip() or self._server is None:
            return
        if self._answers or self.warming:
            return
        following = [*messages, Message("assistant", text.strip()), Message("user", "")]
        self.header_reads += 1
        self._start_warm_up(self._prompt_only(following, tools))

    def _prompt_only(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> dict[str, Any]:
        """The request for ``messages``, to be read into the cache and not answered."""
        request = self._request(messages, tools, self.config.max_tokens)
        request["max_tokens"] = 0  # llama.cpp reads the prompt and stops before a token
        # the user's message ends there ("<|im_end|>\n"): the assistant's header (3 tokens) is
        # read with the turn's last words, once, not at every warm-up
        request["add_generation_prompt"] = False
        return request

    def _start_warm_up(self, request: dict[str, Any]) -> None:
        warm_up = _WarmUp()
        warm_up.done = self._threads.submit(self._run_warm_up, self._server, request, warm_up)
        self._warm_up = warm_up

    @property
    def warming(self) -> bool:
        """A warm-up is reading."""
        return self._warm_up is not None and not self._warm_up.done.done()

    async def warm_up_done(self) -> None:
        """Returns once no warm-up is reading."""
        if self._warm_up is not None:
            await asyncio.wrap_future(self._warm_up.done)

    def _run_warm_up(self, server: Any, request: dict[str, Any], warm_up: _WarmUp) -> None:
        """On a pool thread: the prompt read, unless an answer (or the close) came first; a
        failure is logged (no answer depends on it)."""
        if warm_up.stop.is_set():
            return
        try:
            server.handle_chat_completions(request, warm_up.on_chunk)
        except Exception as error:  # the server's own validation (ValueError, RuntimeError)
            log.warning("local model: a warm-up failed: %s: %s", type(error).__name__, error)
        if warm_up.prompt_tokens is not None:
            self.last_warm_tokens = warm_up.prompt_tokens

    async def generate(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolSpec],
        choice: ToolChoice = "auto",
        *,
        max_tokens: int = 0,
    ) -> AsyncGenerator[LanguageModelEvent, None]:
        """The answer; a call of the tool whose knowledge the prompt already holds is dropped
        (taken once its name is written, its arguments never written: ``_events``), and when
        it was the only call, the model answers again without tools (it calls
        lookup_knowledge for "what is twelve times twelve?", then gives up on "not found").
        A turn asking the time is given the call (``time_call``) and, its result in, the answer
        worded from it (``time_answer``), neither written by the model."""
        if self._server is None:
            raise ProviderError(self.name, "not started", retryable=False)
        if isinstance(choice, ForcedTool):  # llama.cpp takes no named tool: offer it alone
            tools = [tool for tool in tools if tool.name == choice.name]
        if call := time_call(messages, [tool.name for tool in tools]):
            yield call  # asked the time: the call the model should write, without it
            return
        if answer := time_answer(messages):  # and its result in: worded without the model
            self.time_answers += 1
            for piece in reply_pieces(answer):
                yield TextDelta(piece)
            self._read_next_header(messages, tools, answer)
            return
        limit = max_tokens or self.config.max_tokens
        dropped = called = False
        said: list[str] = []
        async for event in self._answer(messages, tools, choice, limit):
            if isinstance(event, ToolCall) and event.name in self._known_tools:
                dropped = True
                continue
            called = called or isinstance(event, ToolCall)
            said += [event.text] if isinstance(event, TextDelta) else []
            if not (dropped and not called and isinstance(event, Usage)):
                yield event
        if dropped and not called:
            said.clear()
            async for event in self._answer(messages, [], "auto", limit):
                said += [event.text] if isinstance(event, TextDelta) else []
                yield event
        if not called:  # (here only when the answer was read to its end)
            self._read_next_header(messages, tools, "".join(said))

    async def _answer(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolSpec],
        choice: ToolChoice,
        max_tokens: int,
    ) -> AsyncGenerator[LanguageModelEvent, None]:
        request = self._request(messages, tools, max_tokens)
        if tools and choice != "auto":
            request["tool_choice"] = "required"
        answer = _Answer(asyncio.get_running_loop())
        self._answers.add(answer)
        running: asyncio.Future[None] | None = None
        try:
            await self._after_warm_up()
            running = answer.loop.run_in_executor(self._threads, self._run, request, answer)
            async for event in _events(answer, tools, self._known_tools):
                if answer.settled and isinstance(event, ToolCall):
                    self.settled_calls += 1
                yield event
        finally:
            answer.stop.set()
            self._answers.discard(answer)
            if running is not None:
                await asyncio.shield(running)
            self.last_prompt_tokens = answer.prompt_tokens or self.last_prompt_tokens

    async def _after_warm_up(self) -> None:
        """Stop any warm-up after the prompt it is reading (one not begun never begins), and
        return once it has: an answer goes to the server after it, never before, as a read
        of an older request coming after the answer would leave the cache on a path no turn
        takes (the next would read its whole conversation again)."""
        if self._warm_up is not None:
            self._warm_up.stop.set()
        if self.warming and self._warm_up is not None:
            await asyncio.shield(asyncio.wrap_future(self._warm_up.done))

    def _request(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], max_tokens: int
    ) -> dict[str, Any]:
        budget = self.config.context_tokens - max_tokens - 400 * bool(tools)
        history = recent_history(messages, budget)
        request: dict[str, Any] = {
            "messages": chat_messages(history, self._system),
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": self.config.temperature,
            "cache_prompt": True,
        }
        if tools:
            request["tools"] = chat_tools(tools)
        return request

    def _run(self, request: dict[str, Any], answer: _Answer) -> None:
        """On a pool thread: the server's blocking call, every chunk handed to ``answer``."""
        try:
            self._server.handle_chat_completions(request, answer.on_chunk)
        except Exception as error:  # the server's own validation (ValueError, RuntimeError)
            answer.on_chunk({"error": {"message": f"{type(error).__name__}: {error}"}})
        finally:
            answer.done()


def _own_maps() -> str:
    """The shared libraries this process has loaded (Linux); "" where that cannot be read."""
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return ""


def _free(held: list[Any]) -> None:
    held.clear()
    gc.collect()


def prompt_threads(config: LocalLlmConfig) -> int:
    """Threads reading a prompt: ``config.prompt_threads``, or by default twice the
    generation's, within the usable cores. A turn's
    prompt is read just after its speech-to-text is done and before text-to-speech starts, so
    the other stages leave the cores free then; reading is compute-bound and gains from each
    (generating is memory-bound and overlaps the text-to-speech, so it keeps to its share).
    Measured on 2 cores under a load of 15-19 (10 new prompt tokens, interleaved, 12 each):
    median 3.39 s with 1 thread, 2.66 s with 2 (spinning threads: 2.81 s)."""
    if config.prompt_threads:
        return config.prompt_threads
    return max(config.resolved_threads, min(usable_cores(), 2 * config.resolved_threads))


SPIN_COUNT = "3000"  # OpenMP's wait at a step before its thread sleeps (~0.1-0.2 ms here)


def brief_openmp_spin(environ: MutableMapping[str, str], maps: str) -> str | None:
    """Make OpenMP's threads wait briefly for each other at a step, then sleep, before libgomp
    is loaded (it reads its environment once, when loaded); returns why it could not, or None.

    The prebuilt xllamacpp runs its threads on OpenMP, so the server's own ``poll`` setting is
    not used. By default libgomp spins ~300,000 rounds at every step of a prompt's reading
    until the other thread arrives; on shared cores that one is often not running, and the
    spinning took 1.0-2.8 CPU-s and 1.2-12 s for a turn's first token under a load of 6-12
    (2 cores). Sleeping at once (``OMP_WAIT_POLICY=passive``) ends that but pays a wake-up at
    each of the several hundred steps of every token: on an idle Intel Xeon (AVX-512, 2 cores)
    a turn's 11-12 new tokens took 550-690 ms to read with two threads passive and 270-300 ms
    spinning 3,000 rounds (``GOMP_SPINCOUNT``), and with one busy core beside them both took
    535-600 ms. In the Chromium benchmark (``python -m loadtest.bench_e2e --media-path lean
    --local-llm-path lean``, load 0.9-1.4, run one after the other) the turn's reading took
    390-475 ms against 460-720 passive, and end of speech -> first answer audio p50 1,234 and
    1,254 ms against 1,643 and 1,588. An operator's own ``OMP_WAIT_POLICY`` or
    ``GOMP_SPINCOUNT`` stands."""
    if "libgomp" in maps:
        return "libgomp was loaded before the model: its threads keep their wait policy as it was"
    if "OMP_WAIT_POLICY" not in environ:
        environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    return None


def _load_server(path: Path, config: LocalLlmConfig) -> Any:
    """The llama.cpp server with the model loaded. Seconds, run off the event loop, though it
    holds the GIL for most of them (measured: the loop stalled ~4 s at a transceiver's start)."""
    if (why := brief_openmp_spin(os.environ, _own_maps())) is not None:
        log.warning("local model: %s", why)
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_parallel = config.parallel
    params.n_ctx = config.context_tokens * config.parallel
    params.cpuparams.n_threads = config.resolved_threads
    params.cpuparams_batch.n_threads = prompt_threads(config)
    # a thread that has done its part sleeps rather than spins waiting for the next (llama.cpp's
    # own thread pool; this build's OpenMP threads wait briefly first: brief_openmp_spin)
    params.cpuparams.poll = params.cpuparams_batch.poll = 0
    # read into memory once (1.2 GB resident) rather than mapped (1.8 GB measured)
    params.load_mode = xllamacpp.llama_load_mode.LLAMA_LOAD_MODE_NONE
    params.cache_ram_mib = 256  # prompts kept beyond the slots' own (8 GiB by default)
    params.api_keys = [secrets.token_urlsafe(32)]
    params.verbosity = 0
    params.sampling.temp = config.temperature
    try:
        return xllamacpp.Server(params)
    except Exception as error:
        raise ProviderError(
            LlamaCppLanguageModel.name, f"{path}: the model did not load: {error}", retryable=False
        ) from error


async def _events(
    answer: _Answer, tools: Sequence[ToolSpec], dropped: frozenset[str] = frozenset()
) -> AsyncGenerator[LanguageModelEvent, None]:
    """The answer's chunks as our events: text (held while it may be a call), calls, usage.
    A call that its first tokens settle (``settled_call``) is taken at once and the rest of
    it is not written (its usage and prompt tokens are then not known: llama.cpp gives them
    at the end). Settled so too: a call of one of ``dropped``, the tools whose calls the
    caller drops whatever their arguments (``generate``: lookup_knowledge's ~20 tokens are
    not written when the knowledge is in the prompt)."""
    tool_names = [tool.name for tool in tools]
    bare = bare_tools(tools) | dropped.intersection(tool_names)
    gate = ToolCallGate(tools_offered=bool(tool_names))
    native = _NativeCalls()
    usage: Usage | None = None
    while (chunk := await answer.queue.get()) is not None:
        if "error" in chunk:
            message = chunk["error"].get("message", "unknown error")
            raise ProviderError(LlamaCppLanguageModel.name, str(message), retryable=False)
        usage = _usage(chunk) or usage
        answer.prompt_tokens = _prompt_tokens(chunk) or answer.prompt_tokens
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            native.add(delta.get("tool_calls") or [])
            if text := gate.push(delta.get("content") or ""):
                yield TextDelta(text)
        if gate.holding and (call := settled_call(gate.held, bare)) is not None:
            answer.stop.set()  # llama.cpp stops at its next token
            answer.settled = True
            yield call
            return
    for event in _ending(gate, native, tool_names):
        yield event
    if usage is not None:
        yield usage


def _ending(gate: ToolCallGate, native: _NativeCalls, tool_names: list[str]) -> list[Any]:
    """What the complete answer adds: the calls it held, or the text it held back."""
    calls = native.calls(tool_names) or (
        parse_tool_calls(gate.held, tool_names) if gate.holding else None
    )
    if calls:
        return list(calls)
    if gate.holding and calls is not None:  # it wrote a call, but of no tool it was offered
        return [TextDelta(CANNOT_DO)]
    text = gate.held if gate.holding else gate.finish()
    if gate.holding and text.lstrip().startswith("<"):  # markup (an echoed <tool_response>)
        return [TextDelta(NO_ANSWER)]
    return [TextDelta(text)] if text else []


def _usage(chunk: dict[str, Any]) -> Usage | None:
    timings = chunk.get("timings")
    if isinstance(timings, dict) and "predicted_n" in timings:
        prompt = int(timings.get("prompt_n", 0)) + int(timings.get("cache_n", 0))
        return Usage(prompt, int(timings["predicted_n"]))
    return None


def _prompt_tokens(chunk: dict[str, Any]) -> PromptTokens | None:
    timings = chunk.get("timings")
    if isinstance(timings, dict) and "prompt_n" in timings:
        return PromptTokens(int(timings.get("cache_n", 0)), int(timings["prompt_n"]))
    return None


class _NativeCalls:
    """Tool calls the server itself parsed from the template's ``<tool_call>`` tags, streamed
    in pieces by index."""

    def __init__(self) -> None:
        self._parts: dict[int, dict[str, str]] = {}

    def add(self, deltas: list[dict[str, Any]]) -> None:
        for delta in deltas:
            part = self._parts.setdefault(int(delta.get("index", 0)), {"id": "", "name": ""})
            function = delta.get("function") or {}
            part["id"] = delta.get("id") or part["id"]
            part["name"] += function.get("name") or ""
            part["arguments"] = part.get("arguments", "") + (function.get("arguments") or "")

    def calls(self, tool_names: list[str]) -> list[ToolCall]:
        return [
            ToolCall(part["id"] or f"call_{index}", part["name"], part.get("arguments") or "{}")
            for index, part in sorted(self._parts.items())
            if part["name"] in tool_names
        ]

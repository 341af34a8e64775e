"""One served model: prompt assembly, validation, and completion runs over the decode loop."""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from config import ModelConfig

from ..errors import InvalidRequestError, RequestTimeoutError, ServerBusyError
from .generate import CausalRunner, Seq2SeqRunner
from .healing import Healing, TokenHealer
from .kvcache import PrefixCache
from .prompts import SPECIAL_TOKEN, FimPrompt, TemplateError, Truncation, keep_last, leading_bos, special_token_id
from .params import Delta, SamplingParams, SequenceResult, TokenLogprob
from .sampling import TokenChooser
from .scheduler import DONE, Scheduler, Work
from .stopping import DedentStop, StopCondition
from .text import IncrementalDetokenizer, SequenceState

log = logging.getLogger(__name__)
GONE = object()  # the client went away while its request waited


@dataclass(frozen=True)
class Job:
    """A validated completion of one prompt: what the decode loop is asked to do."""

    request_id: str
    prompt: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    n: int = 1
    echo: bool = False
    used_fim: bool = False
    healing: Healing | None = None

    @property
    def prompt_tokens(self) -> int:
        """Prompt length as the client sees it (a healed token still counts)."""
        return len(self.prompt_ids) + (1 if self.healing else 0)


class Gate:
    """Counts a model's requests in a worker and refuses new ones past a limit (running plus waiting)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self._mutex = threading.Lock()

    def enter(self) -> Callable[[], None]:
        """Admit a request or raise :class:`ServerBusyError`; return its (idempotent) release."""
        with self._mutex:
            if self.count >= self.limit:
                raise ServerBusyError(f"this worker already has {self.count} requests in progress; retry shortly")
            self.count += 1
        released = threading.Event()

        def release() -> None:
            with self._mutex:
                if not released.is_set():
                    released.set()
                    self.count -= 1

        return release


class Engine:
    """A loaded model and tokenizer, completing the prompts of many requests in one batch."""

    def __init__(
        self,
        config: ModelConfig,
        model: torch.nn.Module,
        tokenizer,
        device: torch.device,
        *,
        reuse_prefix: bool = True,
        threads: tuple[int, int] | None = None,
        token_healing: bool = True,
        truncate_prompts: bool = True,
        debug: bool = False,
        max_batch: int = 8,
        max_waiting: int = 8,
        prefix_cache_bytes: int = 512 * 2**20,
    ):
        self.config = config
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.debug = debug
        self.is_seq2seq = config.kind == "seq2seq"
        if self.is_seq2seq:
            self.runner = Seq2SeqRunner(self.model, device, decoder_prompt=config.decoder_prompt)
        else:
            prefix_cache = PrefixCache(prefix_cache_bytes) if reuse_prefix else None
            self.runner = CausalRunner(self.model, device, prefix_cache)
        # CPU intra-op threads for (prefill, decode); None leaves torch's setting.
        self.scheduler = Scheduler(self.runner, max_batch, threads, config.name)
        self.last_reused = 0  # prompt tokens the last finished request took from the prefix cache
        self.fim = FimPrompt(tokenizer, config.fim.template, end_with_eos=self.is_seq2seq) if config.fim else None
        self.truncate_prompts = truncate_prompts
        self.bos = leading_bos(tokenizer)
        head = self.model.get_output_embeddings()
        self.vocab_size = getattr(head, "out_features", None) or self.model.config.vocab_size
        self.context_length = self._context_length()
        self.eos_ids, self.stop_strings = self._stops()
        self.healer = TokenHealer(tokenizer, self.decode) if token_healing and not self.is_seq2seq else None
        self.gate = Gate(max_batch + max_waiting)

    @property
    def name(self) -> str:
        """The model's primary name."""
        return self.config.name

    @property
    def supports_fim(self) -> bool:
        """Whether a request's suffix is used for fill-in-the-middle."""
        return self.config.fim is not None

    def _context_length(self) -> int:
        if self.config.context_length:
            return self.config.context_length
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            value = getattr(self.model.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    def _stops(self) -> tuple[frozenset[int], tuple[str, ...]]:
        """End-of-sequence ids from the model and tokenizer, plus configured stops.

        A configured stop written like a special token (``<eom>``, ``▁<EOT>``) that the
        vocabulary has stops by id (its text never reaches the output); anything else
        is matched as a string.
        """
        eos = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            eos.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
        strings = []
        for stop in self.config.stop:
            if SPECIAL_TOKEN.fullmatch(stop):
                try:
                    eos.add(special_token_id(self.tokenizer, stop))
                    continue
                except TemplateError:
                    log.warning("model %s: stop %r is not a token of its vocabulary; matching it as text",
                                self.name, stop)
            strings.append(stop)
        return frozenset(eos), tuple(strings)

    # -- prompts -------------------------------------------------------------

    def prompt_budget(self, max_tokens: int, truncate: bool = False) -> int:
        """Prompt tokens allowed beside ``max_tokens`` (a seq2seq encoder has the window to itself).

        When prompts are truncated, a prompt keeps at least half the window: an editor's
        long file with a large max_tokens (Copilot asks for 500) then gets a shorter
        completion instead of an error.
        """
        if self.is_seq2seq:
            return self.context_length
        budget = self.context_length - max_tokens
        return max(budget, self.context_length // 2) if truncate else budget

    def encode(self, prompt: str, suffix: str | None = None, budget: int | None = None,
               truncate: bool = False) -> tuple[list[int], bool, Truncation]:
        """Token ids of the model prompt, whether the FIM template was used, and what was truncated.

        Models without FIM tokens complete from the prefix alone: Copilot sends a
        suffix with every request, and a plain continuation beats an error. Seq2seq
        models always use their template (its sentinel marks the span to generate).
        A FIM prompt always fits ``budget``; a plain one only with ``truncate``.
        """
        budget = self.context_length if budget is None else budget
        if self.fim is None or not (suffix or self.is_seq2seq):
            ids = self.tokenizer(prompt)["input_ids"]
            ids, cut = keep_last(ids, budget, self.bos) if truncate else (ids, Truncation())
            return ids, False, cut
        ids, cut = self.fim.build(prompt, suffix or "", budget)
        return ids, True, cut

    def _too_long(self, prompt_tokens: int, max_tokens: int) -> InvalidRequestError:
        return InvalidRequestError(
            f"This model's maximum context length is {self.context_length} tokens, however you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in your prompt; {max_tokens} for the "
            "completion). Please reduce your prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )

    def prepare(
        self,
        prompt: str,
        params: SamplingParams,
        *,
        suffix: str | None = None,
        n: int = 1,
        echo: bool = False,
        request_id: str = "local",
    ) -> Job:
        """Tokenize and check a request against this model; raise InvalidRequestError if it cannot run."""
        # An echoed prompt is the client's text back, so it is never cut.
        truncate = self.truncate_prompts and not echo
        budget = self.prompt_budget(params.max_tokens, truncate)
        if budget < 1 or (params.max_tokens > self.context_length and not truncate):
            raise self._too_long(len(self.tokenizer(prompt)["input_ids"]), params.max_tokens)
        try:
            ids, used_fim, cut = self.encode(prompt, suffix, budget, truncate)
        except TemplateError:
            raise self._too_long(self.fim.fixed_tokens, params.max_tokens) from None
        if cut:
            log.info("[%s] prompt truncated to fit %d tokens: %d prefix tokens cut at the start, %d suffix tokens "
                     "at the end", request_id, budget, cut.prefix_tokens, cut.suffix_tokens)
        if not ids:
            # Nothing to condition on: start from the beginning-of-sequence token.
            bos = self.tokenizer.bos_token_id
            ids = [bos if bos is not None else min(self.eos_ids, default=0)]
        if len(ids) > budget:
            raise self._too_long(len(ids), params.max_tokens)
        room = self.context_length - (0 if self.is_seq2seq else len(ids))
        if params.max_tokens > room and truncate:
            log.info("[%s] max_tokens %d lowered to %d, the room left in the %d-token window", request_id,
                     params.max_tokens, room, self.context_length)
            params = dataclasses.replace(params, max_tokens=room)
        bad = [token for token, _ in params.logit_bias if not 0 <= token < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"logit_bias has token ids outside this model's vocabulary (0..{self.vocab_size - 1}): {bad[:5]}",
                param="logit_bias",
            )
        if suffix and not used_fim:
            log.debug("[%s] model %s has no fill-in-the-middle template: suffix ignored", request_id, self.name)
        healing = None
        # Healing changes which tokens are generated, so not when the client asked to see them.
        if self.healer and not used_fim and not echo and params.logprobs is None:
            ids, healing = self.healer.heal(ids)
        return Job(request_id, prompt, tuple(ids), params, n, echo, used_fim, healing)

    # -- running -------------------------------------------------------------

    def complete(self, job: Job, best_of: int | None = None, client_gone: Callable[[], bool] | None = None,
                 deadline: float | None = None) -> list[SequenceResult]:
        """Run a job to the end; with ``best_of``, sample that many and keep the ``n`` most likely."""
        wanted = job.n
        if best_of and best_of > job.n:
            job = dataclasses.replace(job, n=best_of)
        generation = Generation(self, job, client_gone, deadline)
        for _ in generation:
            pass
        results = generation.results()
        if len(results) > wanted:
            results = sorted(results, key=lambda r: r.mean_logprob, reverse=True)[:wanted]
            for index, result in enumerate(results):
                result.index = index
        return results

    def warmup(self, rounds: int = 2) -> None:
        """Run short greedy completions so the first real request does not pay first-touch costs."""
        for _ in range(rounds):
            self.forget()
            self.complete(self.prepare("def hello():\n", SamplingParams(max_tokens=8, temperature=0.0),
                                       request_id="warmup"))
        self.forget()

    def forget(self) -> None:
        """Drop the cached prompts (between requests, on the scheduler's thread)."""
        self.scheduler.call(self.runner.forget)

    def token_text(self, token_id: int) -> str:
        """The text of one token, as shown in logprobs."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a token sequence, special tokens dropped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def prompt_logprobs(self, job: Job) -> list[TokenLogprob]:
        """Logprobs of the prompt's own tokens, for ``echo`` with ``logprobs``."""
        ids = list(job.prompt_ids)
        offsets = self._offsets(job)
        entries = [TokenLogprob(self.token_text(ids[0]), None, (), offsets[0])]
        if self.is_seq2seq:  # encoder input: the model gives it no probabilities
            return entries + [TokenLogprob(self.token_text(t), None, (), o) for t, o in zip(ids[1:], offsets[1:])]
        scores = self.runner.score(ids)
        k = job.params.logprobs or 0
        for pos in range(1, len(ids)):
            row = scores[pos - 1]
            top = ()
            if k:
                values, top_ids = row.topk(k)
                top = tuple((self.token_text(t), v) for t, v in zip(top_ids.tolist(), values.tolist()))
            entries.append(TokenLogprob(self.token_text(ids[pos]), float(row[ids[pos]]), top, offsets[pos]))
        return entries

    def _offsets(self, job: Job) -> list[int]:
        """Character offset of each prompt token in the prompt text."""
        ids = list(job.prompt_ids)
        return [len(self.decode(ids[:i])) for i in range(len(ids))]


class Generation:
    """One run of a job through the engine's scheduler: iterate it for deltas; ``results()`` after.

    ``client_gone`` is polled while waiting for tokens (in the queue, during a long
    prefill): editors abandon a request at the next keystroke, and its work should
    stop before it takes the model's time, not when its first token fails to send.
    """

    POLL_SECONDS = 0.05

    def __init__(self, engine: Engine, job: Job, client_gone: Callable[[], bool] | None = None,
                 deadline: float | None = None):
        self.engine = engine
        self.job = job
        self.client_gone = client_gone
        self.deadline = deadline  # time.monotonic() after which the request is stopped
        self._next_check = 0.0  # monotonic time of the next client_gone poll
        self.sequences: list[SequenceState] = []
        self.echo_logprobs: list[TokenLogprob] = []

    @property
    def prompt_tokens(self) -> int:
        """Number of tokens in the model prompt."""
        return self.job.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far over all sequences."""
        return sum(seq.generated for seq in self.sequences)

    def results(self) -> list[SequenceResult]:
        """Each sequence's whole text, finish reason and logprobs."""
        prefix = self.job.prompt if self.job.echo else ""
        return [seq.result(prefix, self.echo_logprobs) for seq in self.sequences]

    def __iter__(self) -> Iterator[Delta]:
        engine, job = self.engine, self.job
        if engine.debug:
            log.info("[%s] model prompt (fim=%s): %r", job.request_id, job.used_fim,
                     engine.tokenizer.decode(job.prompt_ids, skip_special_tokens=False))
            log.info("[%s] prompt ids: %s", job.request_id, list(job.prompt_ids))
            if job.healing:
                log.info("[%s] token healing: last prompt token %r removed; first token from %d candidates",
                         job.request_id, job.healing.text, len(job.healing.allowed))
        self.sequences = [self._sequence(i) for i in range(job.n)]
        if job.echo:
            yield from self._echo()
        if job.params.max_tokens == 0:
            for seq in self.sequences:
                seq.finish_reason = "length"
                yield Delta(seq.index, "", (), "length")
            return
        allowed = job.healing.allowed if job.healing else None
        chooser = TokenChooser(job.params, engine.vocab_size, job.n, engine.device, first_allowed=allowed)
        work = Work(job.request_id, job.prompt_ids, self.sequences, chooser)
        engine.scheduler.submit(work)
        item = None
        try:
            while (item := self._next(work)) is not DONE and item is not GONE:
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            work.cancel()  # a no-op once done; else the client went away
            engine.last_reused = work.reused
            self._log_timing(work, cancelled=item is not DONE and not isinstance(item, BaseException))

    def _next(self, work: Work):
        """The next item of ``work.out``, or GONE (the work cancelled) once the client has gone away."""
        if self.client_gone is None and self.deadline is None:
            return work.out.get()
        while True:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + self.POLL_SECONDS
                if self.client_gone is not None and self.client_gone():
                    log.info("[%s] client went away: request cancelled", self.job.request_id)
                    return GONE
                if self.deadline is not None and now >= self.deadline:
                    log.warning("[%s] request stopped at the server's time limit", self.job.request_id)
                    raise RequestTimeoutError("The request took longer than this server allows and was stopped; "
                                              "retry, perhaps with a smaller max_tokens.")
            try:
                return work.out.get(timeout=max(self._next_check - now, 0.001))
            except queue.Empty:
                pass

    def _sequence(self, index: int) -> SequenceState:
        engine, job = self.engine, self.job
        # The decoder continues the prompt, except in seq2seq models where it starts afresh.
        context = job.prompt_ids if not engine.is_seq2seq or engine.config.decoder_prompt else ()
        detok = IncrementalDetokenizer(engine.decode, context)
        dedent = None
        if job.params.trim_by_indentation:
            last_line = job.prompt.rpartition("\n")[2]
            dedent = DedentStop(last_line if not last_line.strip() else None)
        stop = StopCondition(engine.eos_ids, job.params.max_tokens, engine.stop_strings + job.params.stop, dedent)
        token_text = engine.token_text if job.params.logprobs is not None else None
        # text_offset counts from the start of the prompt, as OpenAI's does.
        healed = job.healing.text if job.healing else ""
        return SequenceState(index, detok, stop, token_text, offset_base=len(job.prompt), skip=healed)

    def _echo(self) -> Iterator[Delta]:
        if self.job.params.logprobs is not None:
            self.echo_logprobs = self.engine.scheduler.call(lambda: self.engine.prompt_logprobs(self.job))
        for seq in self.sequences:
            yield Delta(seq.index, self.job.prompt, tuple(self.echo_logprobs))

    def _log_timing(self, work: Work, cancelled: bool) -> None:
        job, engine = self.job, self.engine
        generated = self.completion_tokens
        end = work.finished or time.perf_counter()
        first = work.first_token
        queued = ((work.started or end) - work.submitted) * 1000
        ttft = (first - work.submitted) * 1000 if first else float("nan")
        rate = (generated - len(self.sequences)) / (end - first) if first and end > first else float("nan")
        running, waiting = engine.scheduler.load
        log.info(
            "[%s] %s: %d prompt tokens (%d reused), %d generated, queued %.0f ms, first token %.0f ms, %.1f tok/s, "
            "total %.0f ms%s (batch: %d running, %d waiting)",
            job.request_id, engine.name, len(job.prompt_ids), work.reused, generated, queued, ttft, rate,
            (end - work.submitted) * 1000, ", cancelled" if cancelled else "", running, waiting,
        )
        if engine.debug:
            for seq in self.sequences:
                log.info(
                    "[%s] sequence %d: finish_reason=%s after %d tokens, stops=%r, ids=%s, text=%r",
                    job.request_id, seq.index, seq.finish_reason, seq.generated, seq.stop.stops,
                    seq.token_ids, seq.text,
                )

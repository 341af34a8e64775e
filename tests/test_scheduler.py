"""Continuous batching, the prefix cache and cancellation, with the tiny model."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from app.engine import SamplingParams, Watch
from app.engine.kvcache import PrefixCache, block_bounds, cache_bytes, cache_from_tensors, layer_tensors
from tests.tiny_models import SAMPLE_CODE

PROMPTS = ["x = 1", "def add(a, b):\n", SAMPLE_CODE, "import os\nimport sys\n\n", SAMPLE_CODE[:90]]


def greedy(max_tokens: int = 20, **settings) -> SamplingParams:
    """Greedy sampling parameters."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **settings)


def no_eos(engine, max_tokens: int, **settings) -> SamplingParams:
    """Greedy parameters that generate exactly ``max_tokens`` tokens (end-of-sequence banned)."""
    return greedy(max_tokens, logit_bias=tuple((t, -100.0) for t in sorted(engine.preparer.eos_ids)), **settings)


def alone(engine, request):
    """Run one request with nothing else in the scheduler."""
    engine.forget()
    list(engine.stream(request))
    return request.results()


class Recorder:
    """Wraps the runner's batch decode and prefill steps to record what the scheduler did, in order."""

    def __init__(self, engine, monkeypatch):
        self.events: list[tuple[str, int]] = []
        self.prefill_threads: set[str] = set()
        batch = engine.runner.batch
        real_decode = batch.decode

        def decode(token_ids):
            self.events.append(("decode", token_ids.shape[0]))
            return real_decode(token_ids)

        monkeypatch.setattr(batch, "decode", decode)
        real_start = engine.runner.start

        def start(prompt_ids):
            prefill = real_start(prompt_ids)
            real_step = prefill.step

            def step():
                self.events.append(("prefill", len(prompt_ids)))
                self.prefill_threads.add(threading.current_thread().name)
                return real_step()

            prefill.step = step
            return prefill

        monkeypatch.setattr(engine.runner, "start", start)

    @property
    def max_rows(self) -> int:
        """The largest batch decoded."""
        return max((rows for kind, rows in self.events if kind == "decode"), default=0)


def run_together(engine, requests):
    """Submit every request while the scheduler is held, so they all run in one batch; return each one's results."""
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=engine.scheduler.call, args=(lambda: (entered.set(), release.wait(30)),))
    holder.start()
    assert entered.wait(30)
    threads = [threading.Thread(target=list, args=(engine.stream(request),)) for request in requests]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while engine.scheduler.load[1] < len(requests) and time.monotonic() < deadline:
        time.sleep(0.005)
    release.set()
    for thread in threads + [holder]:
        thread.join(60)
    return [request.results() for request in requests]


def test_batched_greedy_equals_unbatched(engine, monkeypatch):
    """Prompts of different lengths decoded together give exactly what each gives alone."""
    expected = [alone(engine, engine.prepare(p, greedy(40))) for p in PROMPTS]
    recorder = Recorder(engine, monkeypatch)
    engine.forget()
    together = run_together(engine, [engine.prepare(p, greedy(40)) for p in PROMPTS])
    assert recorder.max_rows >= 3
    for want, got in zip(expected, together):
        assert [r.text for r in got] == [r.text for r in want]
        assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
        assert [r.cumulative_logprob for r in got] == pytest.approx([r.cumulative_logprob for r in want], abs=1e-3)


def test_batched_mixed_settings_equal_unbatched(engine):
    """Stops, n > 1 with seeds, logit bias and penalties keep per-request semantics inside one batch."""
    def prepare_all():
        """The four requests, freshly prepared (a request runs once)."""
        return [
            engine.prepare(PROMPTS[0], greedy(30, stop=("e",))),
            engine.prepare(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0.8, seed=5), n=3),
            engine.prepare(PROMPTS[2], no_eos(engine, 16, frequency_penalty=1.5)),
            engine.prepare(PROMPTS[3], greedy(5, logprobs=2)),
        ]

    expected = [alone(engine, request) for request in prepare_all()]
    engine.forget()
    together = run_together(engine, prepare_all())
    for want, got in zip(expected, together):
        assert [(r.index, r.text, r.finish_reason) for r in got] == [(r.index, r.text, r.finish_reason) for r in want]
    assert all("e" not in r.text for r in together[0])
    assert [r.completion_tokens for r in together[2]] == [16]
    assert [len(entry.top) for entry in together[3][0].logprobs] == [2] * together[3][0].completion_tokens


def test_batch_respects_max_rows(tiny_settings, monkeypatch):
    """No more than max_batch sequences decode together; the rest wait their turn and still finish."""
    from app.engine.loader import load_engine

    engine = load_engine(tiny_settings.models[0], tiny_settings.replace(max_batch=2))
    recorder = Recorder(engine, monkeypatch)
    requests = [engine.prepare(p, no_eos(engine, 60)) for p in PROMPTS]
    results = run_together(engine, requests)
    assert recorder.max_rows == 2
    assert [r[0].completion_tokens for r in results] == [60] * len(PROMPTS)


def test_long_prompt_prefill_interleaves_with_decoding(engine, monkeypatch):
    """A newcomer's prompt blocks alternate with decode steps of the sequences already running."""
    engine.forget()
    long_prompt = SAMPLE_CODE * 2  # several 32-token blocks
    running = engine.prepare("x = 1", no_eos(engine, 200))
    newcomer = engine.prepare(long_prompt, no_eos(engine, 4))
    assert len(newcomer.prompt_ids) > 4 * engine.runner.small_block
    recorder = Recorder(engine, monkeypatch)
    deltas = engine.stream(running)
    next(deltas)  # decoding now
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=engine.scheduler.call, args=(lambda: (entered.set(), release.wait(30)),))
    holder.start()
    assert entered.wait(30)
    newcomer_thread = threading.Thread(target=list, args=(engine.stream(newcomer),))
    newcomer_thread.start()
    while engine.scheduler.load[1] < 1:
        time.sleep(0.001)
    release.set()
    list(deltas)
    newcomer_thread.join(60)
    long_blocks = [i for i, (kind, size) in enumerate(recorder.events)
                   if kind == "prefill" and size == len(newcomer.prompt_ids)]
    assert len(long_blocks) > 3
    between = recorder.events[long_blocks[0]:long_blocks[-1]]
    # At least one step between blocks; more where blocks run on a helper thread beside the decode steps.
    assert sum(kind == "decode" for kind, _ in between) >= len(long_blocks) - 1
    if engine.scheduler._helper is not None:  # spare cores: the blocks ran beside the decode steps
        assert any(name.startswith("prefill-") for name in recorder.prefill_threads)
    assert newcomer.results()[0].completion_tokens == 4 and running.results()[0].completion_tokens == 200


def test_cancelled_work_stops_within_one_step(engine, monkeypatch):
    """Closing a stream drops its sequence at the next step and frees its row; the other goes on."""
    recorder = Recorder(engine, monkeypatch)
    engine.forget()
    keep = engine.prepare(PROMPTS[1], no_eos(engine, 60))
    keep_thread = threading.Thread(target=list, args=(engine.stream(keep),))
    drop = engine.stream(engine.prepare(PROMPTS[0], no_eos(engine, 200)))
    next(drop)
    keep_thread.start()
    while recorder.max_rows < 2:
        time.sleep(0.001)
    drop.close()
    steps_at_cancel = len(recorder.events)
    engine.scheduler.call(lambda: None)  # one scheduler iteration later, the row is gone
    engine.scheduler.call(lambda: None)
    two_row_steps = [i for i, (kind, rows) in enumerate(recorder.events) if kind == "decode" and rows == 2]
    assert max(two_row_steps) <= steps_at_cancel
    keep_thread.join(60)
    assert keep.results()[0].completion_tokens == 60
    assert engine.scheduler.load == (0, 0) and engine.runner.batch.rows == 0


def test_failed_step_fails_its_work_and_the_scheduler_goes_on(engine, monkeypatch):
    """An exception inside a decode step reaches the waiting request; the next request runs normally."""
    expected = alone(engine, engine.prepare(PROMPTS[0], greedy(6)))[0].text
    real_decode = engine.runner.batch.decode
    calls = []

    def failing(token_ids):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_decode(token_ids)

    monkeypatch.setattr(engine.runner.batch, "decode", failing)
    with pytest.raises(RuntimeError, match="boom"):
        list(engine.stream(engine.prepare(PROMPTS[0], greedy(6))))
    assert alone(engine, engine.prepare(PROMPTS[0], greedy(6)))[0].text == expected


# -- the prefix cache, without a model ---------------------------------------------


def fake_cache(length: int, fill: float = 1.0, layers: int = 2) -> object:
    """A DynamicCache of ``layers`` layers holding ``length`` positions of distinct values."""
    base = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1) + fill
    return cache_from_tensors([(base.expand(1, 2, length, 4).clone(), -base.expand(1, 2, length, 4).clone())
                               for _ in range(layers)])


def test_prefix_cache_picks_the_longest_agreeing_prefix():
    """Among entries, the one sharing the most whole blocks wins, and the copy holds exactly that prefix."""
    cache = PrefixCache(2**30)
    short_ids = list(range(100))
    long_ids = list(range(200))
    other = [7] * 200
    for ids, fill in ((short_ids, 1.0), (long_ids, 2.0), (other, 3.0)):
        cache.store(ids, block_bounds(len(ids), 64, 16), fake_cache(len(ids), fill))
    ids = long_ids[:190] + [999] * 20  # parts from long_ids after 190 tokens
    bounds = block_bounds(len(ids), 64, 16)
    index, prefix = cache.lookup(ids, bounds)
    # Both layouts put bounds at 0, 64, 128, 192; the prompts part at 190. (The short entry gives only 64.)
    assert bounds[index] == 128
    keys, values = layer_tensors(prefix)[0]
    assert keys.shape[2] == 128 and torch.equal(keys[0, 0, :, 0], torch.arange(128.0) + 2.0)
    assert cache.hits == 1 and cache.misses == 0
    assert cache.lookup([5, 6, 7], block_bounds(3, 64, 16)) == (0, None)
    assert cache.misses == 1


def test_prefix_cache_entries_are_not_changed_by_reuse():
    """Growing a reused prefix (as prefill does) leaves the stored entry as it was."""
    cache = PrefixCache(2**30)
    ids = list(range(100))
    cache.store(ids, block_bounds(100, 64, 16), fake_cache(100))
    _, prefix = cache.lookup(ids + [1, 2, 3], block_bounds(103, 64, 16))
    prefix.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    stored = layer_tensors(cache.entries[tuple(ids)].cache)[0][0]
    assert stored.shape[2] == 100 and torch.equal(stored[0, 0, :, 0], torch.arange(100.0) + 1.0)


def test_prefix_cache_stays_under_its_budget():
    """Least recently used entries go first; an entry bigger than the whole budget is not kept."""
    one = cache_bytes(fake_cache(100))
    cache = PrefixCache(int(2.5 * one))
    prompts = [[i] * 100 for i in range(4)]
    for i, ids in enumerate(prompts[:2]):
        cache.store(ids, block_bounds(100, 64, 16), fake_cache(100, float(i)))
    cache.lookup(prompts[0], block_bounds(100, 64, 16))  # 0 is now the most recently used
    cache.store(prompts[2], block_bounds(100, 64, 16), fake_cache(100, 2.0))
    assert set(cache.entries) == {tuple(prompts[0]), tuple(prompts[2])}
    assert cache.nbytes <= cache.budget
    cache.store([9] * 300, block_bounds(300, 64, 16), fake_cache(300))
    assert tuple([9] * 300) not in cache.entries and cache.nbytes <= cache.budget


def test_engine_prefix_cache_budget_under_many_prompts(tiny_settings):
    """Serving many different prompts, the engine's cache never holds more than its budget."""
    from app.engine.loader import load_engine

    engine = load_engine(tiny_settings.models[0], tiny_settings.replace(prefix_cache_mb=1))
    prefix_cache = engine.runner.prefix_cache
    for i in range(12):
        alone_prompt = f"# file {i}\n" + SAMPLE_CODE * 2
        list(engine.stream(engine.prepare(alone_prompt, greedy(2))))
        assert prefix_cache.nbytes <= prefix_cache.budget == 2**20
    assert 0 < len(prefix_cache) < 12


def test_batch_layer_rows_join_and_leave_like_padded_concatenation():
    """Rows joining (shorter and longer than the batch), decode appends across regrowth and rows leaving
    give exactly the keys and values of left-padding with zeros and concatenating; sources stay untouched."""
    from app.engine.kvcache import BatchLayer

    def padded(tensor, length):
        return torch.cat([tensor.new_zeros(*tensor.shape[:2], length - tensor.shape[2], tensor.shape[3]), tensor], 2)

    first = torch.randn(2, 2, 5, 4)
    before = first.clone()
    layer, expected = BatchLayer(first, -first), first
    for step in range(120):  # past the first column capacity: the buffers are regrown
        new = torch.full((expected.shape[0], 2, 1, 4), float(step))
        keys, values = layer.update(new, -new)
        expected = torch.cat([expected, new], 2)
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
        if step == 3:  # a shorter row joins, as a view of one row repeated
            short = torch.randn(1, 2, 3, 4)
            layer.add_rows(short.expand(2, -1, -1, -1), -short.expand(2, -1, -1, -1))
            expected = torch.cat([expected, padded(short.expand(2, -1, -1, -1), expected.shape[2])])
        if step == 50:  # a longer row joins: the others are padded further on the left
            long = torch.randn(1, 2, expected.shape[2] + 40, 4)
            layer.add_rows(long, -long)
            expected = torch.cat([padded(expected, long.shape[2]), long])
        if step == 80:  # rows leave, and the columns only the longest row used are dropped
            layer.keep_rows([1, 2], drop_columns=30)
            expected = expected[[1, 2], :, 30:]
        assert torch.equal(layer.keys, expected) and torch.equal(layer.values, -expected)
    assert torch.equal(first, before)


def test_client_gone_while_queued_cancels_before_prefill(engine, monkeypatch):
    """A request whose client left while it waited ends at once, and its prompt is never prefilled."""
    recorder = Recorder(engine, monkeypatch)
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=engine.scheduler.call, args=(lambda: (entered.set(), release.wait(30)),))
    holder.start()
    assert entered.wait(30)
    gone = threading.Event()
    deltas = engine.stream(engine.prepare(SAMPLE_CODE, greedy(8)), Watch(client_gone=gone.is_set))
    output = []
    consumer = threading.Thread(target=lambda: output.extend(deltas))
    consumer.start()
    gone.set()
    consumer.join(5)
    assert not consumer.is_alive() and output == []  # while the model was still busy elsewhere
    release.set()
    holder.join(30)
    engine.scheduler.call(lambda: None)
    assert not any(kind == "prefill" for kind, _ in recorder.events)
    assert engine.scheduler.load == (0, 0)


def test_abandoned_prefill_keeps_its_blocks_for_the_next_prompt(engine):
    """The blocks an abandoned request fed are reused by the next keystroke's prompt, bit for bit."""
    from app.engine.runners import CausalRunner

    ids = engine.tokenizer(SAMPLE_CODE * 3)["input_ids"][:200]
    runner = CausalRunner(engine.model, engine.device, PrefixCache(2**30), big_block=64, small_block=16)
    with torch.inference_mode():
        abandoned = runner.start(ids[:190])
        abandoned.step()
        abandoned.step()
        abandoned.abandon()
        assert [len(e.ids) for e in runner.prefix_cache.entries.values()] == [128]
        warm = runner.start(ids)
        assert warm.reused == 128
        while not warm.step():
            pass
        cold = CausalRunner(engine.model, engine.device, big_block=64, small_block=16).start(ids)
        while not cold.step():
            pass
    assert torch.equal(warm.logits, cold.logits)
    # The finished prompt's entry covers the abandoned one's, which is dropped.
    assert [len(e.ids) for e in runner.prefix_cache.entries.values()] == [200]


def test_prefix_cache_drops_entries_a_new_one_covers():
    """Storing a prompt drops entries that are its beginning with the same block bounds, and no others."""
    cache = PrefixCache(2**30)
    ids = list(range(150))
    cache.store(ids[:64], block_bounds(150, 64, 16)[:2], fake_cache(64))
    cache.store(ids[:100], block_bounds(100, 64, 16), fake_cache(100))  # other bounds after 64: kept
    cache.store(ids, block_bounds(150, 64, 16), fake_cache(150))
    assert sorted(len(k) for k in cache.entries) == [100, 150]
    assert cache.nbytes == cache_bytes(fake_cache(100)) + cache_bytes(fake_cache(150))


def test_scheduler_fault_fails_the_work_and_keeps_serving(engine, monkeypatch):
    """An unexpected error in the scheduler's own bookkeeping reaches the request; the thread survives."""
    real_admit = engine.scheduler._admit
    calls = []

    def broken_admit():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bookkeeping bug")
        return real_admit()

    monkeypatch.setattr(engine.scheduler, "_admit", broken_admit)
    with pytest.raises(RuntimeError, match="bookkeeping bug"):
        list(engine.stream(engine.prepare(PROMPTS[0], greedy(4))))
    assert alone(engine, engine.prepare(PROMPTS[0], greedy(4)))[0].completion_tokens >= 1
    assert engine.scheduler.load == (0, 0)


# -- fair prefill: several prompts fed block by block -------------------------------------

SHORT_PROMPT = "import os\nimport sys\n"  # 8 tokens: one 8-token block
LONG_PROMPT = SAMPLE_CODE * 2  # 171 tokens: 22 blocks


def small_block_engine(tiny_settings, **options):
    """A tiny engine whose prompts go in 8-token blocks (4 for the tail), so a long prompt takes many blocks."""
    from app.engine.loader import load_engine
    from app.engine.runners import CausalRunner
    from app.engine.scheduler import Scheduler

    engine = load_engine(tiny_settings.models[0], tiny_settings.replace(**options))
    engine.runner = CausalRunner(engine.model, engine.device, PrefixCache(2**26), big_block=8, small_block=4)
    engine.scheduler = Scheduler(engine.runner, engine.options.max_batch, engine.scheduler.threads, "small-blocks")
    return engine


@pytest.fixture(scope="module")
def small_blocks(tiny_settings):
    """The tiny model with 8-token prompt blocks."""
    return small_block_engine(tiny_settings)


class Blocks:
    """Wraps the runner's prefills to log whose block each step fed, and to act right after given blocks."""

    def __init__(self, engine, monkeypatch, prompts):
        self.prompts = [tuple(ids) for ids in prompts]
        self.fed: list[int] = []  # for each block fed, in order: its prompt's index in ``prompts``
        self.actions: dict[tuple[int, int], object] = {}  # (prompt index, its n-th block) -> callable
        real_start = engine.runner.start

        def start(prompt_ids):
            prefill = real_start(prompt_ids)
            if tuple(prompt_ids) in self.prompts:
                prefill.step = self._wrap(prefill.step, self.prompts.index(tuple(prompt_ids)))
            return prefill

        monkeypatch.setattr(engine.runner, "start", start)

    def _wrap(self, real_step, which: int):
        def step():
            done = real_step()
            self.fed.append(which)
            action = self.actions.get((which, self.fed.count(which)))
            if action is not None:
                action()
            return done

        return step

    def gaps(self, which: int) -> list[int]:
        """Blocks fed from the start to this prompt's first block, and between its blocks (both ends counted)."""
        positions = [-1] + [i for i, fed in enumerate(self.fed) if fed == which]
        return [b - a for a, b in zip(positions, positions[1:])]


def arrive(engine, request, threads: list) -> None:
    """Stream ``request`` on a new thread and wait until the scheduler has it (from inside a block)."""
    thread = threading.Thread(target=list, args=(engine.stream(request),))
    thread.start()
    threads.append(thread)
    deadline = time.monotonic() + 30
    while engine.scheduler.load[1] < 2 and time.monotonic() < deadline:
        time.sleep(0.001)


def test_short_request_is_not_stuck_behind_a_long_prefill(small_blocks, monkeypatch):
    """An 8-token request arriving mid-prefill gets its first token next; both outputs equal running alone."""
    engine = small_blocks
    expected = [alone(engine, engine.prepare(p, no_eos(engine, 8)))[0].text for p in (LONG_PROMPT, SHORT_PROMPT)]
    engine.forget()
    long, short = engine.prepare(LONG_PROMPT, no_eos(engine, 8)), engine.prepare(SHORT_PROMPT, no_eos(engine, 8))
    assert len(short.prompt_ids) == 8 and len(long.prompt_ids) > 20 * 8
    recorder = Recorder(engine, monkeypatch)
    blocks, threads = Blocks(engine, monkeypatch, [long.prompt_ids, short.prompt_ids]), []
    blocks.actions[(0, 3)] = lambda: arrive(engine, short, threads)
    list(engine.stream(long))
    threads[0].join(60)
    assert blocks.fed[:4] == [0, 0, 0, 1]  # the short one's block came right after the block it arrived in
    long_blocks = [i for i, event in enumerate(recorder.events) if event == ("prefill", len(long.prompt_ids))]
    first_decode = next(i for i, (kind, _) in enumerate(recorder.events) if kind == "decode")
    assert sum(i > first_decode for i in long_blocks) >= 15  # it decoded while the long prompt was still being fed
    assert short.timings.first_token < long.timings.first_token
    assert [long.results()[0].text, short.results()[0].text] == expected
    assert engine.scheduler.load == (0, 0)


def test_long_prompts_all_progress_and_a_cancelled_one_leaves(small_blocks, monkeypatch):
    """Three long prompts fed at once each get a block at least every PATIENCE + 3; cancelling one mid-prefill
    drops it at the next iteration, keeps its fed blocks, and leaves the others' output as it is alone."""
    from app.engine.scheduler import PATIENCE

    engine = small_blocks
    texts = [f"# file {i}\n" + LONG_PROMPT for i in range(3)]
    expected = [alone(engine, engine.prepare(text, no_eos(engine, 6)))[0].text for text in texts]
    engine.forget()
    requests = [engine.prepare(text, no_eos(engine, 6)) for text in texts]
    blocks = Blocks(engine, monkeypatch, [r.prompt_ids for r in requests])
    blocks.actions[(1, 3)] = requests[1].cancel
    results = run_together(engine, requests)
    assert blocks.fed.count(1) == 3  # no block after the one during which it was cancelled
    for which in (0, 2):
        assert max(blocks.gaps(which)) <= PATIENCE + 3
        assert results[which][0].text == expected[which]
    assert requests[1].results()[0].completion_tokens == 0
    kept = [entry.ids for entry in engine.runner.prefix_cache.entries.values()]
    assert tuple(requests[1].prompt_ids[:3 * 8]) in kept
    assert engine.scheduler.load == (0, 0) and engine.runner.batch.rows == 0


def test_prompts_fed_at_once_stay_within_max_rows(tiny_settings, monkeypatch):
    """Rows are promised to prompts as they start: decoding and prompts being fed never hold more than max_batch."""
    engine = small_block_engine(tiny_settings, max_batch=2)
    requests = [engine.prepare(f"# file {i}\n" + LONG_PROMPT, no_eos(engine, 6)) for i in range(4)]
    recorder, seen = Recorder(engine, monkeypatch), []
    blocks = Blocks(engine, monkeypatch, [r.prompt_ids for r in requests])

    def look():
        """Rows decoding and rows promised to the prompts being fed, seen from inside a block."""
        seen.append((len(engine.scheduler.rows), len(engine.scheduler._prefilling)))

    blocks.actions.update({(i, n): look for i in range(4) for n in (1, 5, 20)})
    results = run_together(engine, requests)
    assert max(rows + prefilling for rows, prefilling in seen) == 2 and max(p for _, p in seen) == 2
    assert recorder.max_rows <= 2 and [r[0].completion_tokens for r in results] == [6] * 4
    # The last two start only once one of the first two has been fed whole (and has decoded).
    first_of_others = min(blocks.fed.index(2), blocks.fed.index(3))
    assert first_of_others > min(len(blocks.fed) - 1 - blocks.fed[::-1].index(i) for i in (0, 1))


def test_next_keystroke_waits_for_the_prompt_it_extends(small_blocks, monkeypatch):
    """A prompt extending one being fed waits for it rather than computing the same blocks beside it, and starts
    from the blocks it fed when the older request is abandoned."""
    engine = small_blocks
    expected = alone(engine, engine.prepare(LONG_PROMPT + "    ", no_eos(engine, 6)))[0].text
    engine.forget()
    first = engine.prepare(LONG_PROMPT, no_eos(engine, 6))
    second = engine.prepare(LONG_PROMPT + "    ", no_eos(engine, 6))
    blocks, threads = Blocks(engine, monkeypatch, [first.prompt_ids, second.prompt_ids]), []
    blocks.actions[(0, 3)] = lambda: arrive(engine, second, threads)
    blocks.actions[(0, 6)] = first.cancel
    list(engine.stream(first))
    threads[0].join(60)
    assert blocks.fed[:6] == [0] * 6 and blocks.fed.count(0) == 6
    assert second.reused == 6 * 8
    assert second.results()[0].text == expected


def test_scheduler_fault_fails_every_prompt_being_fed(small_blocks, monkeypatch):
    """A fault in the scheduler's bookkeeping while several prompts are fed fails each of them; serving goes on."""
    engine = small_blocks
    scheduler, real_next = engine.scheduler, engine.scheduler._next_prefill

    def broken_next():
        if len(scheduler._prefilling) == 3:
            raise RuntimeError("bookkeeping bug")
        return real_next()

    monkeypatch.setattr(scheduler, "_next_prefill", broken_next)
    requests = [engine.prepare(f"# file {i}\n" + LONG_PROMPT, greedy(4)) for i in range(3)]
    errors: list[str] = []

    def consume(request):
        try:
            list(engine.stream(request))
        except RuntimeError as exc:
            errors.append(str(exc))

    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=scheduler.call, args=(lambda: (entered.set(), release.wait(30)),))
    holder.start()
    assert entered.wait(30)
    threads = [threading.Thread(target=consume, args=(request,)) for request in requests]
    for thread in threads:
        thread.start()
    while scheduler.load[1] < 3:
        time.sleep(0.001)
    release.set()
    for thread in threads + [holder]:
        thread.join(60)
    assert errors == ["bookkeeping bug"] * 3
    monkeypatch.setattr(scheduler, "_next_prefill", real_next)
    assert alone(engine, engine.prepare(SHORT_PROMPT, greedy(4)))[0].completion_tokens >= 1
    assert scheduler.load == (0, 0) and not scheduler._prefilling

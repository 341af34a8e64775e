"""llama.cpp's POST /infill as the llama.vscode and llama.vim plugins use it, and repository context in prompts.

The request bodies below copy the plugins' field sets, as their sources build them:
- llama.vim, autoload/llama.vim at a1c8e6e40cb45df59b78add5b65d575386832465: ``s:fim`` (completion),
  ``s:ring_update`` (the ring buffer's warm-up), ``s:fim_on_response`` (what it accepts and reads);
- llama.vscode, src/llama-server.ts at 3938fb3568b98e3ddfcf2ce3dd52d9570552b579: ``createRequestPayload``
  (``noPredict`` false: completion; true: the extra-context warm-up), src/completion.ts
  ``getComplFromContent`` and src/statusbar.ts ``showInfo`` (what it reads).
Copilot's ``extra.context`` is microsoft/vscode-copilot-chat's, completions-core lib/src/openai/fetch.ts at
31acd00a86424e2ee6e980e54919cf31fbf88030: ``[stable context, recent-edits context]``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
import tomllib
from pathlib import Path

import pytest

import config
from app.engine import SamplingParams
from app.engine.context import COMMENTS, comment_style
from app.engine.loader import load_engine
from app.engine.params import ContextChunk, PromptContext
from app.engine.prepare import ModelFacts, Preparer
from app.engine.sampling import TopK, build_processors
from app.engine.sequence import IncrementalDetokenizer, SequenceState
from app.engine.stopping import IndentStop, StopCondition, TimeBudget
from app.llamacpp import compact_json, parse_infill_request, select_fields
from app.protocol import InvalidRequestError, parse_completion_request
from config import ConfigError, Settings, model_from_mapping, settings_from_mapping

from .test_zoo import plain, special
from .tiny_zoo import FAMILIES

_unique = itertools.count()


def chunk_text(tag: str, lines: int = 6) -> str:
    """Code no other test sends (so the prefix cache holds nothing of it), ending with a newline: ~11 tokens a line."""
    n = next(_unique)
    return "".join(f"{tag}{n}_{i} = {i}\n" for i in range(lines))


def llama_vim_fim(prefix: str, middle: str, suffix: str, extra: list[dict], indent: int = 0) -> dict:
    """The body of llama.vim's ``s:fim`` (first request of a position: t_max_predict_ms 250)."""
    return {
        "id_slot": 0,
        "input_prefix": prefix,
        "input_suffix": suffix,
        "input_extra": extra,
        "prompt": middle,
        "n_predict": 128,
        "stop": [],
        "n_indent": indent,
        "top_k": 40,
        "top_p": 0.90,
        "samplers": ["top_k", "top_p", "infill"],
        "stream": False,
        "cache_prompt": True,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 250,
        "response_fields": [
            "content",
            "timings/prompt_n",
            "timings/prompt_ms",
            "timings/prompt_per_token_ms",
            "timings/prompt_per_second",
            "timings/predicted_n",
            "timings/predicted_ms",
            "timings/predicted_per_token_ms",
            "timings/predicted_per_second",
            "truncated",
            "tokens_cached",
        ],
    }


def llama_vim_ring_update(extra: list[dict]) -> dict:
    """The body of llama.vim's ``s:ring_update``: new extra context, nothing to predict."""
    return {
        "id_slot": 0,
        "input_prefix": "",
        "input_suffix": "",
        "input_extra": extra,
        "prompt": "",
        "n_predict": 0,
        "temperature": 0.0,
        "samplers": [],
        "stream": False,
        "cache_prompt": True,
        "t_max_prompt_ms": 1,
        "t_max_predict_ms": 1,
        "response_fields": [""],
    }


def llama_vscode_fim(prefix: str, prompt: str, suffix: str, chunks: list[dict], nindent: int = 0) -> dict:
    """The body of llama.vscode's ``createRequestPayload(false, ...)`` with its default settings.

    ``model`` is its ``ai_model`` setting, whose default names no model of this server.
    """
    return {
        "id_slot": 0,
        "input_prefix": prefix,
        "input_suffix": suffix,
        "input_extra": chunks,
        "prompt": prompt,
        "n_predict": 128,
        "n_cmpl": 3,
        "top_k": 40,
        "top_p": 0.99,
        "stream": False,
        "samplers": ["top_k", "top_p", "infill"],
        "cache_prompt": True,
        **({"n_indent": nindent} if nindent else {}),
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 500,
        "model": "google/gemini-2.5-flash",
    }


def llama_vscode_prepare(chunks: list[dict]) -> dict:
    """The body of llama.vscode's ``createRequestPayload(true, "", "", chunks, "", ...)``: the extra-context warm-up."""
    return {
        "id_slot": 0,
        "input_prefix": "",
        "input_suffix": "",
        "input_extra": chunks,
        "prompt": "",
        "n_predict": 0,
        "samplers": [],
        "cache_prompt": True,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 1,
    }


def vim_chunk(text: str, filename: str = "src/util.py") -> dict:
    """A llama.vim ring chunk (its ``time`` is Vim's reltime() list)."""
    return {"text": text, "time": [1718, 422000], "filename": filename}


def vscode_chunk(text: str, filename: str = "/home/dev/proj/src/util.py") -> dict:
    """A llama.vscode ring chunk."""
    return {"text": text, "time": 1718000000000, "filename": filename}


def infill(client, body: dict, status: int = 200):
    """POST /infill; the response (its status checked)."""
    response = client.post("/infill", json=body)
    assert response.status_code == status, response.get_data(as_text=True)
    return response


def vim_accepts(raw: str) -> bool:
    """llama.vim's check before decoding a reply: ``'^\\s*{'`` and ``'\\v"content"\\s*:"'`` (no space after the colon)."""
    return re.match(r"\s*\{", raw) is not None and re.search(r'"content"\s*:"', raw) is not None


# -- the plugins' requests, end to end ---------------------------------------------------------


def test_llama_vim_completion_is_accepted_and_carries_the_fields_it_asks_for(client):
    """llama.vim's request: a compact reply with exactly the response_fields, flattened under their slash names."""
    body = llama_vim_fim("def add(a, b):\n", "    ret", "\n", [vim_chunk(chunk_text("vim"))], indent=4)
    response = infill(client, body)
    raw = response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert vim_accepts(raw)
    reply = json.loads(raw)
    assert list(reply) == body["response_fields"]
    assert isinstance(reply["content"], str) and isinstance(reply["truncated"], bool)
    assert reply["timings/prompt_n"] > 0 and reply["timings/prompt_ms"] >= 0
    assert reply["timings/predicted_n"] >= 1 and reply["tokens_cached"] >= 0
    assert all(isinstance(reply[k], (int, float)) for k in body["response_fields"] if k.startswith("timings/"))


def test_the_compact_rule_holds_in_debug_mode_too(app):
    """Flask indents JSON in debug mode ('"content": "'); /infill replies stay compact whatever the app's settings."""
    app.debug = True
    client = app.test_client()
    raw = infill(client, {"input_prefix": "x = ", "n_predict": 2, "temperature": 0}).get_data(as_text=True)
    assert vim_accepts(raw) and raw == compact_json(json.loads(raw))


def test_llama_vscode_completion_returns_its_n_cmpl_results(client):
    """llama.vscode's request (n_cmpl 3, its default model name): a list of three results with the fields it reads."""
    body = llama_vscode_fim("def add(a, b):\n", "    ", "\n", [vscode_chunk(chunk_text("code"))], nindent=4)
    raw = infill(client, body).get_data(as_text=True)
    assert re.search(r'"content":"', raw)
    results = json.loads(raw)
    assert isinstance(results, list) and [r["index"] for r in results] == [0, 1, 2]
    for result in results:
        assert isinstance(result["content"], str) and result["stop"] is True
        assert result["model"] == "tiny"  # its model name is not served: the default model answers
        assert result["generation_settings"]["n_ctx"] == 256
        assert result["generation_settings"]["n_indent"] == 4 and result["generation_settings"]["top_p"] == 0.99
        assert result["tokens_cached"] >= 0 and isinstance(result["truncated"], bool)
        timings = result["timings"]
        assert set(timings) >= {"prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms",
                                "predicted_per_second"}
        assert timings["predicted_n"] == result["tokens_predicted"] >= 1
        assert timings["prompt_n"] + timings["cache_n"] == result["tokens_evaluated"]


def test_one_completion_is_an_object_not_a_list(client):
    """n_cmpl 1 (the default) answers with the result itself, as llama.cpp does; llama.vscode then reads .content."""
    body = {**llama_vscode_fim("x = 1\n", "y = ", "\n", []), "n_cmpl": 1}
    reply = infill(client, body).get_json()
    assert isinstance(reply, dict) and "content" in reply and reply["index"] == 0


def test_a_served_model_name_picks_that_model(client):
    """``model`` naming a served model (or alias) picks it."""
    reply = infill(client, {"input_prefix": "x = ", "n_predict": 1, "model": "tiny-fim"}).get_json()
    assert reply["model"] == "tiny-fim"
    assert infill(client, {"input_prefix": "x = ", "n_predict": 1, "model": "codegen"}).get_json()["model"] == "tiny"


@pytest.mark.parametrize("model", ["tiny", "tiny-fim"])
@pytest.mark.parametrize("warm_up", [llama_vscode_prepare, llama_vim_ring_update])
def test_warm_up_fills_the_prefix_cache_for_the_next_completion(client, model, warm_up):
    """n_predict 0 returns empty content at once, its prompt in the prefix cache: the next request reuses it."""
    chunks = [vim_chunk(chunk_text("warm", 4))]
    cold = infill(client, {**llama_vim_fim("def f():\n", "    ", "\n", [vim_chunk(chunk_text("cold", 4))]),
                           "model": model}).get_json()
    assert cold["tokens_cached"] == 0 and not cold["truncated"]  # the chunk fits beside n_predict 128
    response = infill(client, {**warm_up(chunks), "model": model})
    reply = response.get_json()
    assert reply == {} or (reply["content"] == "" and reply["tokens_predicted"] == 0)
    warm = infill(client, {**llama_vim_fim("def f():\n", "    ", "\n", chunks), "model": model}).get_json()
    assert warm["tokens_cached"] >= 32
    assert warm["timings/prompt_n"] < cold["timings/prompt_n"]


def test_warm_up_reply_without_response_fields(client):
    """llama.vscode's warm-up gets the whole result: empty content, nothing predicted, the prompt evaluated."""
    reply = infill(client, llama_vscode_prepare([vscode_chunk(chunk_text("prep", 8))])).get_json()
    assert reply["content"] == "" and reply["tokens_predicted"] == 0 and reply["timings"]["predicted_n"] == 0
    assert reply["tokens_evaluated"] > 32 and reply["timings"]["prompt_n"] == reply["tokens_evaluated"]


def test_response_fields_flatten_paths_and_skip_missing_ones():
    """Each existing path becomes one flat key, in the order asked; a path that leads nowhere is left out."""
    result = {"content": "x", "timings": {"prompt_n": 3, "predicted_n": 2}, "truncated": False}
    assert select_fields(result, ["timings/prompt_n", "content", "timings/nope", "", "truncated/x", "timings"]) == {
        "timings/prompt_n": 3, "content": "x", "timings": {"prompt_n": 3, "predicted_n": 2}}


def sse(response) -> list[dict]:
    """The decoded ``data:`` events of a stream (every event checked to be one compact JSON line).

    The response is closed afterwards, as a WSGI server does (that releases the admission ticket).
    """
    try:
        raw = response.get_data(as_text=True)
    finally:
        response.close()
    assert raw.endswith("\n\n") and "[DONE]" not in raw
    events = [block for block in raw.split("\n\n") if block]
    assert all(block.startswith("data: ") and "\n" not in block for block in events)
    return [json.loads(block[len("data: "):]) for block in events]


def test_stream_sends_pieces_then_each_result(client):
    """stream: pieces {index, content, stop: false}, then one final result per completion; the text matches."""
    body = {"input_prefix": "def add(a, b):\n", "input_suffix": "\n", "n_predict": 8, "temperature": 0,
            "input_extra": [vim_chunk(chunk_text("stream"))], "n_cmpl": 2}
    whole = infill(client, body).get_json()
    response = infill(client, {**body, "stream": True})
    assert response.mimetype == "text/event-stream"
    events = sse(response)
    pieces = [e for e in events if e["stop"] is False]
    finals = [e for e in events if e["stop"] is True]
    assert events[-len(finals):] == finals and [f["index"] for f in finals] == [0, 1]
    for final, result in zip(finals, whole):
        assert "".join(p["content"] for p in pieces if p["index"] == final["index"]) == result["content"]
        assert final["content"] == "" and final["tokens_predicted"] == result["tokens_predicted"]
        assert set(final["timings"]) == set(result["timings"])


def test_stream_final_event_honours_response_fields(client):
    """llama.cpp applies response_fields to a stream's final event only."""
    body = {**llama_vim_fim("x = 1\n", "", "\n", []), "stream": True, "n_predict": 3}
    events = sse(infill(client, body))
    assert list(events[-1]) == body["response_fields"]
    assert all(set(e) == {"index", "content", "stop"} for e in events[:-1])


def test_stream_error_before_the_first_byte_is_an_http_error(client):
    """A request refused before generation (too many sequences) is a 400 envelope, not an event stream."""
    response = infill(client, {"input_prefix": "x", "stream": True, "n_cmpl": 100}, 400)
    assert response.get_json()["error"]["code"] == "too_many_sequences"


def test_every_request_gives_its_place_back(client, engines):
    """Whole, streamed and refused /infill requests all release their admission tickets."""
    body = {"input_prefix": "x = ", "n_predict": 2}
    infill(client, body)
    sse(infill(client, {**body, "stream": True, "n_cmpl": 2}))
    infill(client, {**body, "n_cmpl": 100}, 400)
    assert engines["tiny"].stats().requests == 0


# -- the fields' meaning --------------------------------------------------------------------


def test_fields_map_onto_the_completion():
    """prompt goes after input_prefix (llama.cpp's code, not its README); the sampling fields are honoured."""
    body = parse_infill_request({**llama_vim_fim("def f():\n", "    ret", "\nx = 1\n", [vim_chunk("a = 1\n")], 4),
                                 "seed": 7, "stop": ["\n\n"]})
    completion = body.completion()
    assert completion.prompts == ("def f():\n    ret",) and completion.suffix == "\nx = 1\n"
    assert completion.n == 1 and not completion.stream
    params = completion.params
    assert (params.max_tokens, params.top_k, params.top_p, params.min_indent, params.time_budget_ms) == \
        (128, 40, 0.9, 4, 250)
    assert params.seed == 7 and params.stop == ("\n\n",) and params.temperature == 0.8  # llama.cpp's default
    assert completion.context == PromptContext((ContextChunk("a = 1\n", "src/util.py"),))


@pytest.mark.parametrize("fields, wanted", [
    ({}, None),  # the server's time_budget_ms
    ({"t_max_predict_ms": 0}, 0),
    ({"t_max_predict_ms": -1}, 0),
    ({"t_max_predict_ms": 1000}, 1000),
])
def test_t_max_predict_ms_is_the_time_budget(fields, wanted):
    """t_max_predict_ms is the per-request time budget; 0 or less turns it off."""
    assert parse_infill_request({"input_prefix": "x", **fields}).completion().params.time_budget_ms == wanted


@pytest.mark.parametrize("model", ["tiny", "tiny-fim"])
def test_t_max_predict_ms_ends_the_completion_at_a_line_end(engines, model):
    """Once t_max_predict_ms has passed, the completion ends after its next newline (the clock made to jump)."""
    engine = engines[model]
    completion = parse_infill_request({"input_prefix": "x = 1", "input_suffix": "\n", "n_predict": 30,
                                       "temperature": 0, "t_max_predict_ms": 1000}).completion()
    newline = engine.tokenizer.convert_tokens_to_ids("Ċ")  # byte-level BPE's "\n": every token a line end
    params = dataclasses.replace(completion.params, logit_bias=((newline, 100.0),))
    request = engine.prepare(completion.prompts[0], params, suffix=completion.suffix)
    budget = request.sequences[0].stop.budget
    assert isinstance(budget, TimeBudget) and budget.seconds == 1.0
    ticks = iter(range(0, 10**6, 2))  # each token 2 s after the last
    budget.clock = lambda: next(ticks)
    [timed] = engine.complete(request)
    assert (timed.text, timed.finish_reason) == ("\n\n", "length")  # the first line end past the budget
    free = engine.prepare(completion.prompts[0], dataclasses.replace(params, time_budget_ms=0),
                          suffix=completion.suffix)
    assert free.sequences[0].stop.budget is None and engine.complete(free)[0].text == "\n" * 30


def test_n_predict_minus_one_is_the_model_default():
    """n_predict -1 (llama.cpp's default, 'until done') leaves max_tokens to the model's default."""
    assert parse_infill_request({"input_prefix": "x"}).completion().params.max_tokens is None
    assert parse_infill_request({"input_prefix": "x", "n_predict": 5}).completion().params.max_tokens == 5


def test_n_indent_reaches_the_sequences(engines):
    """n_indent becomes each sequence's indentation stop."""
    engine = engines["tiny"]
    completion = parse_infill_request({"input_prefix": "def f():\n", "prompt": "    x", "n_indent": 4}).completion()
    request = engine.prepare(completion.prompts[0], completion.params)
    assert isinstance(request.sequences[0].stop.dedent, IndentStop) and request.sequences[0].stop.dedent.minimum == 4
    plain = parse_infill_request({"input_prefix": "def f():\n"}).completion()
    assert engine.prepare(plain.prompts[0], plain.params).sequences[0].stop.dedent is None


# -- n_indent: the stop -------------------------------------------------------------------


@pytest.mark.parametrize("text, end", [
    ("return x", None),  # one line: the cursor's own line is never checked
    ("x\n    y\n  z", 8),  # the line indented 2 < 4 ends it, at its start
    ("x\n    y\nz", 8),
    ("x\n\n    y\n", None),  # blank lines do not end it (llama.cpp's does)
    ("x\n    y\n  ", None),  # a line of only whitespace so far: undecided
    ("x\n\t\ty", 2),  # characters, not columns: two tabs are 2 < 4
    ("x\n        deeper\n    same", None),
])
def test_indent_stop_finds_the_first_under_indented_line(text, end):
    """llama.cpp's n_indent: the completion ends at the start of the first later line indented less."""
    assert IndentStop(4).find(text) == end


@pytest.mark.parametrize("unsent, held", [("x = 1", 0), ("x\n", 1), ("x\n  ", 3), ("x\n  y", 0), ("\n\t", 2)])
def test_indent_stop_holds_back_an_undecided_line(unsent, held):
    """The line end and whitespace of a line not yet known to be indented enough wait."""
    assert IndentStop(4).held_back(unsent) == held


def test_indent_stop_streams_only_text_it_keeps():
    """Streamed pieces never carry text the stop later cuts: their join is the final text."""
    pieces = {1: "    return a", 2: "\n", 3: "  ", 4: "  ", 5: "b = 1", 6: "\n", 7: "c", 8: "\n"}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    stop = StopCondition(frozenset({0}), 50, (), IndentStop(4))
    seq = SequenceState(0, IncrementalDetokenizer(decode, window=0), stop)
    sent = []
    for token in pieces:
        delta = seq.push(token, 0.0)
        if delta is not None:
            sent.append(delta.text)
        if seq.finished:
            break
    assert seq.text == "    return a\n    b = 1\n" and "".join(sent) == seq.text
    assert seq.finish_reason == "stop"


# -- sampling -----------------------------------------------------------------------------


def test_top_k_keeps_the_k_most_likely():
    """top_k masks all but the k highest logits of each row; the chain applies it only when sampling."""
    import torch

    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [0.0, -1.0, 2.0, 1.0]])
    kept = TopK(2)(logits, None)
    assert torch.isinf(kept).tolist() == [[True, False, True, False], [True, True, False, False]]
    assert any(isinstance(p, TopK) for p in build_processors(SamplingParams(top_k=2), 4, torch.device("cpu")))
    assert not build_processors(SamplingParams(top_k=2, temperature=0.0), 4, torch.device("cpu"))


@pytest.mark.parametrize("route, body", [("/infill", {"input_prefix": "def f():\n", "n_predict": 3}),
                                         ("/v1/completions", {"prompt": "def f():\n", "max_tokens": 3})])
def test_a_vanishing_temperature_is_greedy_not_a_500(client, route, body):
    """1e-225 passes the 0..2 check; logits divided by it overflowed to NaN (a 500 before): it is greedy."""
    tiny = client.post(route, json={**body, "temperature": 1e-225})
    greedy = client.post(route, json={**body, "temperature": 0})
    assert tiny.status_code == greedy.status_code == 200
    text = (lambda reply: reply["content"]) if route == "/infill" else (lambda reply: reply["choices"][0]["text"])
    assert text(tiny.get_json()) == text(greedy.get_json())


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param", [
    ({"input_prefix": 5}, "input_prefix"),
    ({"prompt": ["a"]}, "prompt"),
    ({"input_suffix": None, "input_extra": "not a list"}, "input_extra"),
    ({"input_extra": [{"text": 1, "filename": "a.py"}]}, "input_extra.0.text"),
    ({"input_extra": [{"text": "ok"}, {"filename": "b.py"}]}, "input_extra.1.text"),
    ({"input_extra": [{"text": "ok", "filename": 3}]}, "input_extra.0.filename"),
    ({"input_extra": ["text"]}, "input_extra.0"),
    ({"n_predict": "128"}, "n_predict"),
    ({"n_predict": -2}, "n_predict"),
    ({"n_cmpl": 0}, "n_cmpl"),
    ({"n_cmpl": True}, "n_cmpl"),
    ({"n_indent": -1}, "n_indent"),
    ({"n_indent": 1.5}, "n_indent"),
    ({"t_max_predict_ms": "1000"}, "t_max_predict_ms"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 0}, "top_p"),
    ({"temperature": "hot"}, "temperature"),
    ({"stream": "yes"}, "stream"),
    ({"response_fields": "content"}, "response_fields"),
    ({"response_fields": [1]}, "response_fields.0"),
    ({"stop": [1]}, "stop"),
])
def test_bad_fields_are_a_400_envelope(client, body, param):
    """A field of the wrong type or out of range: 400 with the OpenAI envelope naming it (never 422 or 500)."""
    response = client.post("/infill", json={"input_prefix": "x", **body})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"]


@pytest.mark.parametrize("data, content_type", [(b"[1, 2]", "application/json"), (b"{", "application/json"),
                                                (b"input_prefix=x", "text/plain")])
def test_malformed_bodies_are_a_400_envelope(client, data, content_type):
    """Not an object, not JSON, not a JSON content type: 400 envelopes."""
    response = client.post("/infill", data=data, content_type=content_type)
    assert response.status_code == 400 and set(response.get_json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_fields_are_ignored(client):
    """Fields this server does not use (llama.cpp's lora, min_p, id_slot ...) are ignored, as llama.cpp does."""
    body = {"input_prefix": "x = ", "n_predict": 1, "lora": [{"id": 0, "scale": 0.5}], "min_p": "any", "id_slot": "?",
            "samplers": 3, "cache_prompt": "no", "t_max_prompt_ms": [], "input_extra": [{"text": "y = 2\n",
                                                                                            "time": {"any": 1}}]}
    assert "content" in infill(client, body).get_json()


def test_api_key_is_required_when_configured(tiny_settings, engines):
    """/infill sits behind the same key check as the OpenAI routes (the plugins send Authorization: Bearer)."""
    from app import create_app

    client = create_app(tiny_settings.replace(api_keys=("sekret",)), engines=engines.values()).test_client()
    body = {"input_prefix": "x = ", "n_predict": 1}
    assert client.post("/infill", json=body).status_code == 401
    assert client.post("/infill", json=body, headers={"Authorization": "Bearer sekret"}).status_code == 200


# -- repository context in the model prompt --------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_engines(tmp_path_factory):
    """Tiny Qwen2.5-Coder and StarCoder2 models under their zoo entries (which carry a repo format)."""
    raw = tomllib.loads(Path(config.__file__).with_name("zoo.toml").read_text(encoding="utf-8"))
    entries = {m.name: m for m in settings_from_mapping(raw).models}
    root = tmp_path_factory.mktemp("repo-zoo")
    engines = {}
    for name, family in (("qwen2.5-coder-1.5b", "qwen2"), ("starcoder2-3b", "starcoder2")):
        entry = dataclasses.replace(entries[name], source=str(FAMILIES[family](root / family)), dtype="float32")
        engines[name] = load_engine(entry, Settings(models=(entry,), device="cpu", cache_dir=root / "cache",
                                                    answer_cache=0))
    return engines


CONTEXT = PromptContext((ContextChunk("import os\n", "lib/paths.py"), ContextChunk("LIMIT = 3", None)),
                        repo="me/proj")


def test_qwen_repo_layout_follows_the_card(zoo_engines):
    """Qwen2.5-Coder: <|repo_name|>repo\\n, <|file_sep|>path\\ncode\\n per file, <|file_sep|>path\\n, then the FIM part."""
    engine = zoo_engines["qwen2.5-coder-1.5b"]
    tok = engine.tokenizer
    request = engine.prepare("def f():\n", SamplingParams(max_tokens=4, temperature=0), suffix="\n", context=CONTEXT)
    expected = (special(tok, "<|repo_name|>") + plain(tok, "me/proj") + plain(tok, "\n")
                + special(tok, "<|file_sep|>") + plain(tok, "lib/paths.py") + plain(tok, "\n")
                + plain(tok, "import os\n") + plain(tok, "\n")
                + special(tok, "<|file_sep|>") + plain(tok, "snippet") + plain(tok, "\n")
                + plain(tok, "LIMIT = 3\n") + plain(tok, "\n")
                + special(tok, "<|file_sep|>") + plain(tok, "current") + plain(tok, "\n")
                + special(tok, "<|fim_prefix|>") + plain(tok, "def f():\n") + special(tok, "<|fim_suffix|>")
                + plain(tok, "\n") + special(tok, "<|fim_middle|>"))
    assert list(request.prompt_ids) == expected and not request.truncated


def test_starcoder2_repo_layout_follows_the_card(zoo_engines):
    """StarCoder2: <repo_name>repo<file_sep>path\\ncode per file, then <file_sep> and the FIM part."""
    engine = zoo_engines["starcoder2-3b"]
    tok = engine.tokenizer
    request = engine.prepare("def f():\n", SamplingParams(max_tokens=4, temperature=0), suffix="\n", context=CONTEXT)
    expected = (special(tok, "<repo_name>") + plain(tok, "me/proj")
                + special(tok, "<file_sep>") + plain(tok, "lib/paths.py") + plain(tok, "\n") + plain(tok, "import os\n")
                + special(tok, "<file_sep>") + plain(tok, "snippet") + plain(tok, "\n") + plain(tok, "LIMIT = 3\n")
                + special(tok, "<file_sep>") + special(tok, "<fim_prefix>") + plain(tok, "def f():\n")
                + special(tok, "<fim_suffix>") + plain(tok, "\n") + special(tok, "<fim_middle>"))
    assert list(request.prompt_ids) == expected


@pytest.mark.parametrize("name, suffix, marker", [("tiny", None, None), ("tiny-fim", "\n", "<fim_prefix>")])
def test_models_without_a_repo_format_get_commented_snippets(engines, name, suffix, marker):
    """Without a repo format the chunks are comment lines headed by their path, before the prefix (and FIM part)."""
    engine = engines[name]
    request = engine.prepare("def f():\n", SamplingParams(max_tokens=4, temperature=0), suffix=suffix, context=CONTEXT)
    text = engine.tokenizer.decode(request.prompt_ids, skip_special_tokens=False)
    text += request.healing.text if request.healing else ""  # the prompt's last token, re-chosen by the model
    snippets = "# Path: lib/paths.py\n# import os\n\n# LIMIT = 3\n\n"
    assert text == snippets + (f"{marker}def f():\n<fim_suffix>\n<fim_middle>" if marker else "def f():\n")


def test_input_extra_reaches_the_prompt_over_http(client):
    """/infill's input_extra is evaluated with the prompt: more prompt tokens, the same with no extra."""
    body = {"input_prefix": "def f():\n", "n_predict": 1, "temperature": 0}
    bare = infill(client, body).get_json()["tokens_evaluated"]
    extra = [vim_chunk(chunk_text("http", 3), "lib/a.py")]
    with_extra = infill(client, {**body, "input_extra": extra}).get_json()["tokens_evaluated"]
    assert with_extra > bare + 20


@pytest.mark.parametrize("language, path, style", [
    ("typescript", None, ("//", "")), (None, "lib/a.lua", ("--", "")), ("python", "x.js", ("#", "")),
    (None, "style.css", ("/*", "*/")), (None, "README", ("#", "")), ("klingon", None, ("#", "")),
])
def test_comment_syntax_follows_the_edited_file_then_the_chunk(language, path, style):
    """The edited file's language decides the comment syntax, else the chunk's extension, else '#'."""
    assert comment_style(language, path) == style
    assert all(start for start, _ in COMMENTS.values())


def commented_ids(tok, text: str) -> list[int]:
    """The ids of a path-less chunk commented with '#' (as the comment layout writes it)."""
    return plain(tok, "".join(f"# {line}\n" for line in text.splitlines()) + "\n")


def budget_for(engine, room: int) -> SamplingParams:
    """Greedy params whose max_tokens leaves exactly ``room`` prompt tokens (at least half the window).

    A request's ``prompt_tokens`` is what had to fit (``prompt_ids`` lack a token that healing re-chooses).
    """
    assert engine.preparer.context_length // 2 <= room < engine.preparer.context_length
    return SamplingParams(max_tokens=engine.preparer.context_length - room, temperature=0)


def test_context_is_cut_before_the_prompt_and_volatile_chunks_first(engines):
    """Short of room, recent-edit (volatile) chunks go first, then the earliest; a prompt that must be cut gets none."""
    engine = engines["tiny"]
    tok = engine.tokenizer
    prompt, stable_a, stable_b, volatile = (chunk_text(tag, lines) for tag, lines in
                                            (("p", 9), ("sa", 3), ("sb", 3), ("v", 3)))
    context = PromptContext((ContextChunk(stable_a), ContextChunk(stable_b), ContextChunk(volatile, stable=False)))
    whole = engine.prepare(prompt, SamplingParams(max_tokens=4, temperature=0), context=context)
    text = tok.decode(whole.prompt_ids)
    assert all(line in text for line in (stable_a + stable_b + volatile).splitlines()) and not whole.truncated
    # Room for all but the volatile chunk: it goes, though it comes last.
    two = engine.prepare(prompt, budget_for(engine, whole.prompt_tokens - len(commented_ids(tok, volatile))),
                         context=context)
    text = tok.decode(two.prompt_ids)
    assert stable_a.splitlines()[0] in text and stable_b.splitlines()[0] in text
    assert not any(line in text for line in volatile.splitlines())
    assert two.truncated and prompt.splitlines()[0] in text
    # A prompt too long for the window itself: no context at all, and the prompt's start is cut.
    long_prompt = "".join(f"line_{i} = {i}\n" for i in range(120))
    cut = engine.prepare(long_prompt, SamplingParams(max_tokens=4), context=context)
    text = tok.decode(cut.prompt_ids) + (cut.healing.text if cut.healing else "")
    assert not any(line in text for line in (stable_a + stable_b).splitlines())
    assert cut.truncated and len(cut.prompt_ids) <= 252 and text.endswith(long_prompt[-40:])


def test_among_equals_the_earliest_chunk_goes_first(engines):
    """llama.vscode and llama.vim send their ring oldest first: the oldest chunks are left out first."""
    engine = engines["tiny"]
    tok = engine.tokenizer
    prompt, old, new = chunk_text("q", 7), chunk_text("old", 4), chunk_text("new", 4)
    context = PromptContext((ContextChunk(old, "a.py"), ContextChunk(new, "b.py")))
    full = engine.prepare(prompt, SamplingParams(max_tokens=4), context=context)
    one = engine.prepare(prompt, budget_for(engine, full.prompt_tokens - 5), context=context)  # a few short
    text = tok.decode(one.prompt_ids)
    assert all(line in text for line in (new + prompt).splitlines())
    assert not any(line in text for line in old.splitlines())


def test_echo_never_gets_context(engines):
    """An echoed prompt is the client's own text: no context goes in front of it."""
    engine = engines["tiny"]
    request = engine.prepare("x = 1\n", SamplingParams(max_tokens=0), echo=True, context=CONTEXT)
    assert list(request.prompt_ids) == engine.tokenizer("x = 1\n")["input_ids"]


# -- Copilot's extra.context ----------------------------------------------------------------


def test_copilot_extra_context_is_read_stable_first():
    """extra.context is [stable, recent edits]: both become chunks, the first stable; nwo names the repository."""
    body = {"prompt": "def f():\n", "nwo": "me/proj",
            "extra": {"language": "python", "trim_by_indentation": True, "context": ["Path: a.py\nx = 1", "edit", 3]}}
    request = parse_completion_request(body)
    assert request.context == PromptContext((ContextChunk("Path: a.py\nx = 1", stable=True),
                                             ContextChunk("edit", stable=False)), repo="me/proj", language="python")
    assert request.params.trim_by_indentation is True
    assert parse_completion_request({"prompt": "x", "extra": {"context": "not a list"}}).context is None
    assert parse_completion_request({"prompt": "x", "nwo": "me/proj"}).context is None


def test_copilot_context_reaches_the_prompt_in_the_files_language(client, engines):
    """/v1/completions puts extra.context before the prompt, commented in extra.language's syntax."""
    body = {"prompt": "function f() {\n", "max_tokens": 1, "temperature": 0}
    bare = client.post("/v1/completions", json=body).get_json()["usage"]["prompt_tokens"]
    context = ["Compare this snippet from lib/a.ts:\nexport const LIMIT = 3;", "File: b.ts\nlet y = 2;"]
    usage = client.post("/v1/completions", json={**body, "extra": {"language": "typescript", "context": context}})
    tok = engines["tiny"].tokenizer
    commented = ["// Compare this snippet from lib/a.ts:\n// export const LIMIT = 3;\n\n", "// File: b.ts\n// let y = 2;\n\n"]
    assert usage.get_json()["usage"]["prompt_tokens"] == bare + sum(len(plain(tok, text)) for text in commented)


# -- usage.prompt_tokens_details.cached_tokens ------------------------------------------------------


def test_cached_tokens_count_the_reused_prompt(client):
    """The second identical prompt reuses the first's cache: cached_tokens says how much, whole and streamed."""
    body = {"prompt": chunk_text("usage", 6), "max_tokens": 2, "temperature": 0}
    first = client.post("/v1/completions", json=body).get_json()["usage"]
    second = client.post("/v1/completions", json=body).get_json()["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert 32 <= second["prompt_tokens_details"]["cached_tokens"] < second["prompt_tokens"]
    streamed = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    try:
        events = [json.loads(line[6:]) for line in streamed.get_data(as_text=True).split("\n\n")
                  if line.startswith("data: {")]
    finally:
        streamed.close()
    assert events[-1]["usage"]["prompt_tokens_details"] == second["prompt_tokens_details"]


# -- the repo config entry ---------------------------------------------------------------------


def test_repo_entries_are_validated():
    """A repo table needs its three templates with their placeholders, once each, and no others."""
    good = {"name": "<r>{repo}\n", "file": "<s>{path}\n{code}\n", "current": "<s>{path}\n"}
    assert model_from_mapping({"name": "m", "source": "x", "repo": good}).repo.file == good["file"]
    for bad in ({**good, "current": "{path}{path}"}, {**good, "file": "<s>{code}"}, {**good, "name": "<r>"},
                {"name": "{repo}", "file": "{path}{code}"}, {**good, "file": "{path}{code}{repo}"}, "text"):
        with pytest.raises(ConfigError, match="repo"):
            model_from_mapping({"name": "m", "source": "x", "repo": bad})


def test_a_repo_token_the_tokenizer_lacks_fails_the_load(engines):
    """Like the FIM template's, the repo template's special tokens are checked when the model loads."""
    from app.engine.context import RepoTemplateError

    engine = engines["tiny"]
    entry = dataclasses.replace(engine.config, repo=model_from_mapping({"name": "m", "source": "x", "repo": {
        "name": "<|repo_name|>{repo}", "file": "{path}{code}", "current": ""}}).repo)
    with pytest.raises(RepoTemplateError, match="repo_name"):
        Preparer(entry, ModelFacts.of(engine.model), engine.tokenizer, engine.device, engine.options)


def test_invalid_request_error_is_what_the_parser_raises():
    """parse_infill_request raises the protocol's InvalidRequestError (mapped to 400 by app.errors)."""
    with pytest.raises(InvalidRequestError):
        parse_infill_request({"n_cmpl": "3"})

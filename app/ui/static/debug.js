// The model debug page: build the request a chosen editor client would send, run it through the debug API
// (which runs it as that client's route does), stream the completion in, then show what the server did.
"use strict";

const $ = (id) => document.getElementById(id);
let cursor = null; // the caret's place in the code when it last moved (null: the end)

function trackCursor() {
  const code = $("code");
  cursor = code.selectionStart;
  const before = code.value.slice(0, cursor);
  const line = before.split("\n").length;
  const column = cursor - before.lastIndexOf("\n");
  const suffix = code.value.length - cursor;
  $("cursor-note").textContent = `cursor: line ${line}, column ${column} — prefix ${cursor} characters, ` +
    `suffix ${suffix} characters`;
}

function prefixAndSuffix() {
  const text = $("code").value;
  const at = cursor === null ? text.length : Math.min(cursor, text.length);
  return [text.slice(0, at), text.slice(at)];
}

function stopStrings() {
  const raw = $("stop").value.trim();
  if (!raw) return [];
  const parsed = JSON.parse(raw);
  if (!Array.isArray(parsed) || !parsed.every((s) => typeof s === "string")) {
    throw new Error("stop must be a JSON array of strings, e.g. [\"\\n\\n\"]");
  }
  return parsed;
}

// The body and route each client sends (as their sources and recorded requests show).
function clientRequest() {
  const [prefix, suffix] = prefixAndSuffix();
  const model = $("model").value;
  const maxTokens = parseInt($("max-tokens").value, 10);
  const temperature = parseFloat($("temperature").value);
  const stop = stopStrings();
  const client = $("client").value;
  if (client === "copilot") {
    return { client, engine: model, route: `/v1/engines/${model}/completions`, body: {
      prompt: prefix, suffix, max_tokens: maxTokens, temperature, top_p: 1, n: 1, stop,
      extra: { language: $("language").value, trim_by_indentation: true } } };
  }
  if (client === "fauxpilot") {
    const body = { model: "fastertransformer", prompt: prefix, max_tokens: maxTokens, temperature, stop };
    if (suffix) body.suffix = suffix;
    return { client, engine: model, route: `/v1/engines/${model}/completions`, body };
  }
  if (client === "infill") {
    return { client, engine: null, route: "/infill", body: {
      input_prefix: prefix, input_suffix: suffix, prompt: "", n_predict: maxTokens, temperature, stop, model } };
  }
  const body = { model, prompt: prefix, max_tokens: maxTokens, temperature, stop };
  if (suffix) body.suffix = suffix;
  return { client: "openai", engine: null, route: "/v1/completions", body };
}

function shellQuote(text) {
  return "'" + text.replace(/'/g, "'\\''") + "'";
}

function curlCommand() {
  const request = clientRequest();
  const base = window.location.origin + window.location.pathname.replace(/\/ui\/.*$/, "");
  const lines = [`curl -sS ${shellQuote(base + request.route)}`, "-H 'Content-Type: application/json'"];
  if (apiKey()) lines.push(`-H ${shellQuote("Authorization: Bearer " + apiKey())}`);
  lines.push(`-d ${shellQuote(JSON.stringify(request.body))}`);
  return lines.join(" \\\n  ");
}

async function copyCurl() {
  let command;
  try {
    command = curlCommand();
  } catch (error) {
    $("error").textContent = error.message;
    return;
  }
  $("curl").textContent = command;
  $("curl").classList.remove("hidden");
  try {
    await navigator.clipboard.writeText(command);
    $("status").textContent = "(curl command copied)";
  } catch (error) {
    $("status").textContent = "(select the curl command below to copy it)";
  }
}

async function loadModels() {
  const response = await apiFetch("../v1/models");
  if (!response.ok) {
    $("error").textContent = await errorText(response);
    return;
  }
  const select = $("model");
  select.textContent = "";
  for (const model of (await response.json()).data) {
    const label = model.id + (model.fill_in_the_middle ? " (fill-in-the-middle)" : "");
    select.appendChild(element("option", { value: model.id }, label));
  }
}

function showOutput(prefix, completion) {
  const output = $("output");
  output.textContent = "";
  output.appendChild(element("span", { class: "prefix" }, prefix));
  output.appendChild(element("span", { class: "completion", id: "completion-text" }, completion));
}

// Red (unlikely) to green (certain), by the token's probability.
function chipColour(logprob) {
  if (logprob === null || logprob === undefined) return "#eef0f3";
  const probability = Math.exp(logprob);
  return `hsl(${Math.round(probability * 120)}, 75%, 80%)`;
}

function visible(text) {
  return text.replace(/\n/g, "↵\n").replace(/\t/g, "→") || "∅";
}

function describe(token) {
  const lines = [`${JSON.stringify(token.text)}  logprob ${token.logprob === null ? "—" : token.logprob.toFixed(3)}` +
    (token.logprob === null ? "" : `  p=${Math.exp(token.logprob).toFixed(3)}`)];
  if (token.special) lines.push("special token");
  if (token.healed) lines.push("healed: chosen among tokens that begin with the prompt's removed last token");
  for (const alternative of token.top || []) {
    lines.push(`  ${JSON.stringify(alternative.text).padEnd(18)} ${alternative.logprob.toFixed(3)}`);
  }
  return lines.join("\n");
}

function chip(token, kind) {
  const node = element("span", { class: "chip " + kind }, visible(token.text));
  if (token.special) node.classList.add("special");
  if (token.healed) node.classList.add("healed");
  node.style.background = chipColour(token.logprob);
  node.title = describe(token);
  node.addEventListener("mouseenter", (event) => showTooltip(event, describe(token)));
  node.addEventListener("mouseleave", hideTooltip);
  node.addEventListener("click", () => {
    document.querySelectorAll(".chip.selected").forEach((other) => other.classList.remove("selected"));
    node.classList.add("selected");
    $("alternatives").textContent = describe(token);
  });
  return node;
}

function marker(text) {
  return element("span", { class: "chip marker" }, text);
}

function showTooltip(event, text) {
  const tip = $("tooltip");
  tip.textContent = text;
  tip.style.left = `${event.clientX + 12}px`;
  tip.style.top = `${event.clientY + 12}px`;
  tip.classList.remove("hidden");
}

function hideTooltip() {
  $("tooltip").classList.add("hidden");
}

function ms(value) {
  return value === null || value === undefined ? "—" : `${value.toFixed(1)} ms`;
}

function stopText(stop) {
  if (!stop.rule) return "did not end (the request was cut short)";
  const detail = stop.detail === null ? "" : ` ${JSON.stringify(stop.detail)}`;
  const cut = stop.cut_at === null ? "" : `, text cut at character ${stop.cut_at}`;
  return `${stop.rule}${detail} after ${stop.after_tokens} tokens${cut}`;
}

function fact(table, name, value, id) {
  const row = element("tr");
  row.appendChild(element("th", {}, name));
  const cell = element("td", id ? { id } : {}, value);
  row.appendChild(cell);
  table.appendChild(row);
}

function showTrace(trace) {
  const prompt = trace.prompts[0];
  const table = $("facts");
  table.textContent = "";
  fact(table, "model / route", `${trace.model}  ←  ${trace.client}: POST ${trace.route}`);
  prompt.choices.forEach((choice) => {
    fact(table, `stop (choice ${choice.index})`, `finish_reason ${choice.finish_reason}: ${stopText(choice.stop)}`,
      choice.index === 0 ? "stop-reason" : undefined);
  });
  fact(table, "prompt", `${prompt.tokens.length} tokens of a ${trace.context_length}-token window` +
    (prompt.fim ? `, fill-in-the-middle: ${prompt.fim_template}` : ", plain (no fill-in-the-middle)"));
  const cut = prompt.truncation;
  fact(table, "truncation", cut.prefix_tokens || cut.suffix_tokens || cut.context_chunks_left_out
    ? `${cut.prefix_tokens} tokens cut from the prefix's start, ${cut.suffix_tokens} from the suffix's end, ` +
      `${cut.context_chunks_left_out} context chunks left out` : "none");
  fact(table, "token healing", prompt.healing
    ? `last prompt token ${JSON.stringify(prompt.healing.text)} removed; the first token chosen among ` +
      `${prompt.healing.candidates} that begin with it` : "none");
  fact(table, "reused prefix", `${prompt.reused_tokens} prompt tokens from the prefix cache`, "reused");
  const t = prompt.timings;
  fact(table, "timings", `queued ${ms(t.queued_ms)}, prefill ${ms(t.prefill_ms)}, first token ` +
    `${ms(t.first_token_ms)}, total ${ms(t.total_ms)}, ` +
    `${t.tokens_per_second === null ? "—" : t.tokens_per_second.toFixed(1)} tokens/s`, "timings");
  $("facts-section").classList.remove("hidden");

  const chips = $("prompt-tokens");
  chips.textContent = "";
  if (cut.prefix_tokens) chips.appendChild(marker(`⋯ ${cut.prefix_tokens} tokens cut`));
  prompt.tokens.forEach((token) => chips.appendChild(chip(token, "prompt-token")));
  if (prompt.healing) {
    const healed = marker(`healed: ${JSON.stringify(prompt.healing.text)}`);
    healed.title = "This last prompt token was removed; the model chose the first generated token among those " +
      "that begin with it.";
    chips.appendChild(healed);
  }
  $("prompt-section").classList.remove("hidden");

  const completions = $("completion-tokens");
  completions.textContent = "";
  prompt.choices.forEach((choice) => {
    const line = element("div", { class: "chips" });
    if (prompt.choices.length > 1) line.appendChild(marker(`choice ${choice.index}`));
    choice.tokens.forEach((token) => line.appendChild(chip(token, "completion-token")));
    const end = marker(`■ ${choice.stop.rule || "cut short"}${choice.stop.detail ? " " + visible(choice.stop.detail) : ""}`);
    end.classList.add("stop-chip");
    line.appendChild(end);
    completions.appendChild(line);
  });
  $("completion-section").classList.remove("hidden");
}

async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (event.startsWith("data: ")) onEvent(JSON.parse(event.slice(6)));
    }
  }
}

async function send() {
  $("error").textContent = "";
  let request;
  try {
    request = clientRequest();
  } catch (error) {
    $("error").textContent = error.message;
    return;
  }
  const [prefix] = prefixAndSuffix();
  let completion = "";
  showOutput(prefix, "");
  $("status").textContent = "(running…)";
  $("send").disabled = true;
  const started = performance.now();
  try {
    const response = await apiFetch("api/complete", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ client: request.client, engine: request.engine, body: request.body, stream: true,
        prompt_logprobs: $("score-prompt").checked }),
    });
    if (!response.ok) {
      $("error").textContent = await errorText(response);
      $("status").textContent = "";
      return;
    }
    await readEvents(response, (event) => {
      if (event.delta && event.delta.index === 0) {
        completion += event.delta.text;
        $("completion-text").textContent = completion;
      } else if (event.trace) {
        const choice = event.trace.prompts[0].choices[0];
        if (choice) $("completion-text").textContent = choice.text;
        showTrace(event.trace);
      } else if (event.error) {
        $("error").textContent = event.error.message;
      }
    });
    $("status").textContent = `(done in ${((performance.now() - started) / 1000).toFixed(2)} s)`;
  } catch (error) {
    $("error").textContent = String(error);
    $("status").textContent = "";
  } finally {
    $("send").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const code = $("code");
  for (const event of ["keyup", "click", "select", "input", "focus"]) code.addEventListener(event, trackCursor);
  code.setSelectionRange(code.value.length, code.value.length);
  trackCursor();
  $("send").addEventListener("click", send);
  $("copy-curl").addEventListener("click", copyCurl);
  loadModels();
});

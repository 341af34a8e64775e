// Drives Continue's own LLM adapter (@continuedev/openai-adapters) against a server the way Continue's
// autocomplete does with an OpenAI-compatible model: node continue_adapters.mjs BASE_URL MODEL
// Prints one JSON object (the last line) with what each call returned, for the Python test to check.
//
// Continue (core/llm/index.ts, BaseLLM) builds the adapter with
//   constructLlmApi({ provider, apiKey, apiBase, requestOptions })
// after adding a trailing "/" to the configured apiBase ("http://HOST:PORT/v1" -> ".../v1/"); the
// adapter resolves "fim/completions" against it (new URL), so the slash is what keeps "/v1".
//   - Models that support FIM: BaseLLM.streamFim -> adapter.fimStream({model, prompt: prefix, suffix,
//     max_tokens, temperature, top_p, frequency_penalty, presence_penalty, stop, stream: true}), and
//     each chunk read by fromChatCompletionChunk (core/llm/openaiTypeConverters.ts): the text is
//     choices[0].delta.content (Mistral's FIM format), chunks without it are skipped.
//   - Otherwise: streamComplete with the FIM tokens in the prompt; through the adapter that is
//     completionStream (the openai SDK's completions.create), read as choices[0].text.
import { constructLlmApi } from "@continuedev/openai-adapters";

const [base, model] = process.argv.slice(2);
const api = constructLlmApi({ provider: "openai", apiBase: `${base}/v1/`, apiKey: "sk-continue" });
const prefix = "def fibonacci(n):\n    ";
const suffix = "\n    return n\n";
const otherSuffix = "\n\nprint(fibonacci(10))\n";
// The stops Continue's autocomplete sends (core/autocomplete/templating/getStopTokens.ts) for a model
// with its default template (<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>, AutocompleteTemplate.ts):
// the template's, then "\n\n", "\r\n\r\n", "/src/", "#- coding: utf-8", "```". Neither path cuts the list
// for a server that is not api.openai.com (OpenAI.getMaxStopWords is Infinity; fimStream sends it as is).
const STOPS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>", "</fim_middle>",
               "</code>", "\n\n", "\r\n\r\n", "/src/", "#- coding: utf-8", "```"];
const options = { max_tokens: 12, temperature: 0, stop: STOPS };
const signal = () => new AbortController().signal;

// Continue's fromChatCompletionChunk, for the text it takes from one chunk.
const continueContent = (chunk) => chunk.choices?.[0]?.delta?.content || undefined;

async function fim(body) {
  let text = "";
  let plainText = "";
  let chunks = 0;
  for await (const chunk of api.fimStream({ ...options, ...body, stream: true }, signal())) {
    chunks += 1;
    text += continueContent(chunk) ?? "";
    plainText += chunk.choices.map((c) => c.text ?? "").join("");
  }
  return { text, plain_text: plainText, chunks };
}

async function complete(body) {
  let text = "";
  let chunks = 0;
  for await (const chunk of api.completionStream({ ...options, ...body, stream: true }, signal())) {
    chunks += 1;
    text += chunk.choices[0]?.text ?? "";
  }
  return { text, chunks };
}

const out = {};
out.fim = await fim({ model, prompt: prefix, suffix });
out.fim_in_prompt = await complete({ model, prompt: `<fim_prefix>${prefix}<fim_suffix>${suffix}<fim_middle>` });
out.fim_other_suffix = await fim({ model, prompt: prefix, suffix: otherSuffix });

// fimStream throws the response body as the message (no status); the openai SDK its own errors.
try {
  await fim({ model: "no-such-model", prompt: prefix, suffix });
  out.fim_missing = "no error";
} catch (error) {
  out.fim_missing = { message: error.message };
}
try {
  await complete({ model: "no-such-model", prompt: prefix });
  out.complete_missing = "no error";
} catch (error) {
  out.complete_missing = { status: error.status, name: error.constructor.name };
}
console.log(JSON.stringify(out));

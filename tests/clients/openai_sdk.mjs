// Drives the official openai Node SDK against a server: node openai_sdk.mjs BASE_URL
// Prints one JSON object with what each call returned, for the Python test to check.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: `${process.argv[2]}/v1`, apiKey: "not-needed", maxRetries: 0 });
const prompt = "def add(a, b):\n";
const out = {};

const whole = await client.completions.create({ model: "codegen", prompt, max_tokens: 8, temperature: 0 });
out.whole = { id: whole.id, object: whole.object, text: whole.choices[0].text, usage: whole.usage,
              finish_reason: whole.choices[0].finish_reason };

const stream = await client.completions.create({ model: "codegen", prompt, max_tokens: 8, temperature: 0,
                                                 stream: true });
let streamed = "";
let chunks = 0;
for await (const chunk of stream) {
  chunks += 1;
  streamed += chunk.choices.map((c) => c.text).join("");
}
out.stream = { text: streamed, chunks };

const several = await client.completions.create({ model: "codegen", prompt, max_tokens: 4, n: 2, logprobs: 2,
                                                  temperature: 0.8, seed: 1 });
out.several = several.choices.map((c) => ({ index: c.index, tokens: c.logprobs.tokens.length,
                                            top: c.logprobs.top_logprobs[0] }));

const echo = await client.completions.create({ model: "codegen", prompt, max_tokens: 2, echo: true });
out.echo = echo.choices[0].text;

try {
  await client.completions.create({ model: "codegen", prompt, temperature: 5 });
  out.bad = "no error";
} catch (error) {
  out.bad = { bad_request: error instanceof OpenAI.BadRequestError, status: error.status, param: error.param };
}
try {
  await client.completions.create({ model: "no-such-model", prompt });
  out.missing = "no error";
} catch (error) {
  out.missing = { not_found: error instanceof OpenAI.NotFoundError, status: error.status };
}
console.log(JSON.stringify(out));

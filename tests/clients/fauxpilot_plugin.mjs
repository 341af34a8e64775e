// The VSCode FauxPilot extension's requests (Venthe.fauxpilot), made with the libraries and the
// versions its package-lock pins, called the way its AccessBackend does:
//   1.1.8+ "openai" mode: openai 4.3.1, completions.create on baseURL `${server}/${engine}`;
//   1.1.8+ "axios" mode: axios 1.5.0, POST /completions on that baseURL, no Authorization at all;
//   1.1.6-1.1.7: openai 3.3.0, OpenAIApi(configuration, basePath).createCompletion.
// Usage: node fauxpilot_plugin.mjs SERVER ENGINE TOKEN   (SERVER like http://host:5000/v1/engines)
// Prints {mode: {text, finish}} or {mode: {error, status}} per mode as one JSON object.
import OpenAI from "openai-4.3.1";
import openaiV3 from "openai-3.3.0";
import axios from "axios";

const [server, engine, token] = process.argv.slice(2);
const baseURL = `${server}/${engine}`;
// The extension's settings defaults: model, maxTokens, temperature; stop is ["\n"] for inline completions.
const body = { model: "fastertransformer", prompt: "def hello_world():\n    ", max_tokens: 200, temperature: 0.1,
               stop: ["\n"] };

async function outcome(call) {
  try {
    const choice = (await call()).choices[0];  // the extension reads choices[0].text only
    return { text: choice.text, finish: choice.finish_reason };
  } catch (error) {
    return { error: error.message, status: error.status ?? error.response?.status ?? null };
  }
}

const results = {
  openai: await outcome(() => new OpenAI({ apiKey: token, baseURL }).completions.create(body)),
  axios: await outcome(async () => (await axios.create({ baseURL, timeout: 20000 }).post("/completions", body)).data),
  openai_v3: await outcome(async () => {
    const api = new openaiV3.OpenAIApi(new openaiV3.Configuration({ apiKey: token }), baseURL);
    return (await api.createCompletion(body)).data;
  }),
};
console.log(JSON.stringify(results));

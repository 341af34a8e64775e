// Shared by the pages: the API key kept in this browser session only, and fetch with it.
"use strict";

const KEY_STORAGE = "fauxpilot-lite-key";

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

// Ask for a key (the server answered 401); resolves once one is entered.
function askForKey(message) {
  const form = document.getElementById("key-form");
  form.classList.remove("hidden");
  document.getElementById("key-message").textContent = message || "This server needs an API key.";
  const input = document.getElementById("key-input");
  input.focus();
  return new Promise((resolve) => {
    form.onsubmit = (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, input.value.trim());
      form.classList.add("hidden");
      showKeyState();
      resolve();
    };
  });
}

function showKeyState() {
  const state = document.getElementById("key-state");
  if (state) state.textContent = apiKey() ? "API key: set for this session" : "";
}

// fetch with the key; on 401 ask for one and try again.
async function apiFetch(url, options = {}) {
  for (;;) {
    const response = await fetch(url, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
    if (response.status !== 401) return response;
    let message = "This server needs an API key.";
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    await askForKey(message);
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `HTTP ${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

function element(tag, attributes = {}, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

document.addEventListener("DOMContentLoaded", showKeyState);

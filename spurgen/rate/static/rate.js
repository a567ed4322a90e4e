"use strict";
// The rating page of `spurgen rate`. The server hands out this rater's images in their own order with the
// answers so far and where to resume. Every click is sent at once; the requests go one after another, so
// they reach the server in the order they were given and the last click always wins.

const STORAGE_KEY = "spurgen-rater";
const OBJECT_KEYS = { y: "yes", n: "no", u: "unsure" };

const state = {
  rater: null,
  items: [],    // {id, question, naturalness, object_present} in this rater's order
  pos: 0,       // index of the image shown; items.length is the end screen
  ready: false, // the image shown has loaded: answers before that would rate an image nobody saw
  saveFailed: false,
};
let saveQueue = Promise.resolve();
let pendingSaves = 0;

const $ = (id) => document.getElementById(id);
const isAnswered = (item) => item.naturalness !== null && item.object_present !== null;
const imageUrl = (item) => `/image/${item.id}`;

async function start(name) {
  let body;
  try {
    const response = await fetch(`/api/study?rater=${encodeURIComponent(name)}`);
    body = await response.json();
    if (!response.ok) throw new Error(body.error);
  } catch (error) {
    askName(error.message);
    return;
  }
  state.rater = body.rater;
  state.items = body.items;
  localStorage.setItem(STORAGE_KEY, body.rater);
  // The name in the address lets a rater bookmark the study or continue in another browser.
  const url = new URL(location.href);
  url.searchParams.set("rater", body.rater);
  history.replaceState(null, "", url);
  $("rater-name").textContent = body.rater;
  $("who").hidden = false;
  $("name-form").hidden = true;
  show(body.resume);
}

function askName(message = "") {
  state.rater = null;
  for (const id of ["who", "rating", "done"]) $(id).hidden = true;
  $("name-form").hidden = false;
  $("name-error").textContent = message;
  $("name-input").focus();
}

function show(pos) {
  state.pos = Math.max(0, Math.min(pos, state.items.length));
  const atEnd = state.pos === state.items.length;
  $("rating").hidden = atEnd;
  $("done").hidden = !atEnd;
  updateProgress();
  if (atEnd) {
    state.ready = false;
    return;
  }
  const item = state.items[state.pos];
  const image = $("image");
  // Setting the same address again fires no load event, so only a new image resets the loading state.
  if (image.getAttribute("src") !== imageUrl(item)) {
    state.ready = false;
    $("frame").classList.add("loading");
    $("image-error").hidden = true;
    image.src = imageUrl(item);
  }
  $("question").textContent = item.question;
  $("prev").disabled = state.pos === 0;
  markChoices(item);
  const next = state.items[state.pos + 1];
  if (next) new Image().src = imageUrl(next); // warms the browser cache for the next image
}

function updateProgress() {
  const total = state.items.length;
  const answered = state.items.filter(isAnswered).length;
  $("progress-text").textContent = `Image ${Math.min(state.pos + 1, total)} of ${total} · ${answered} answered`;
  $("progress-bar").max = total;
  $("progress-bar").value = answered;
  const missing = total - answered;
  $("done-text").textContent = missing === 0
    ? "All images rated. Thank you!"
    : `${missing} of ${total} images still need an answer.`;
  $("first-unanswered").hidden = missing === 0;
}

function markChoices(item) {
  for (const button of document.querySelectorAll("[data-naturalness]")) {
    button.setAttribute("aria-pressed", String(Number(button.dataset.naturalness) === item.naturalness));
  }
  for (const button of document.querySelectorAll("[data-object]")) {
    button.setAttribute("aria-pressed", String(button.dataset.object === item.object_present));
  }
}

function nextUnanswered(after) {
  const later = state.items.findIndex((item, i) => i > after && !isAnswered(item));
  if (later !== -1) return later;
  const earlier = state.items.findIndex((item) => !isAnswered(item));
  return earlier === -1 ? state.items.length : earlier;
}

function answer(field, value) {
  const item = state.items[state.pos];
  if (!item || !state.ready) return;
  const wasAnswered = isAnswered(item);
  item[field] = value;
  markChoices(item);
  save(item.id, { [field]: value });
  // Completing an image moves on; changing an earlier answer stays, so both answers can be changed.
  if (!wasAnswered && isAnswered(item)) show(nextUnanswered(state.pos));
  else updateProgress();
}

function save(id, fields) {
  const rater = state.rater;
  setPending(pendingSaves + 1);
  saveQueue = saveQueue
    .then(async () => {
      const response = await fetch("/api/answer", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ rater, id, ...fields }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error(body.error || `HTTP ${response.status}`);
      }
    })
    .catch((error) => {
      state.saveFailed = true;
      $("save-error").textContent = `An answer was not saved (${error.message}). Check that the rating ` +
        "server is running, then reload the page: it resumes at the first image without saved answers.";
      $("save-error").hidden = false;
    })
    .finally(() => setPending(pendingSaves - 1));
}

function setPending(count) {
  pendingSaves = count;
  const status = $("save-status");
  status.dataset.pending = String(count);
  status.textContent = count > 0 ? "saving…" : state.saveFailed ? "" : "all answers saved";
}

function wire() {
  $("name-form").addEventListener("submit", (event) => {
    event.preventDefault();
    start($("name-input").value);
  });
  $("switch-rater").addEventListener("click", () => {
    localStorage.removeItem(STORAGE_KEY);
    history.replaceState(null, "", location.pathname);
    $("name-input").value = "";
    askName();
  });
  $("image").addEventListener("load", () => {
    state.ready = true;
    $("frame").classList.remove("loading");
  });
  $("image").addEventListener("error", () => {
    $("frame").classList.remove("loading");
    $("image-error").hidden = false;
  });
  $("naturalness").addEventListener("click", (event) => {
    const button = event.target.closest("[data-naturalness]");
    if (button) answer("naturalness", Number(button.dataset.naturalness));
  });
  $("object").addEventListener("click", (event) => {
    const button = event.target.closest("[data-object]");
    if (button) answer("object_present", button.dataset.object);
  });
  $("prev").addEventListener("click", () => show(state.pos - 1));
  $("next").addEventListener("click", () => show(state.pos + 1));
  $("back-from-done").addEventListener("click", () => show(state.pos - 1));
  $("first-unanswered").addEventListener("click", () => show(nextUnanswered(-1)));
  document.addEventListener("keydown", (event) => {
    // Leave typing in the name field and browser shortcuts (Ctrl-R, Cmd-1) alone.
    if (state.rater === null || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target instanceof HTMLInputElement) return;
    const key = event.key.toLowerCase();
    if (/^[1-5]$/.test(key)) answer("naturalness", Number(key));
    else if (Object.hasOwn(OBJECT_KEYS, key)) answer("object_present", OBJECT_KEYS[key]);
    else if (key === "arrowleft") show(state.pos - 1);
    else if (key === "arrowright") show(state.pos + 1);
    else return;
    event.preventDefault();
  });
  // Closing the tab while an answer is on its way would lose it: ask first.
  window.addEventListener("beforeunload", (event) => {
    if (pendingSaves > 0) event.preventDefault();
  });
}

wire();
const remembered = new URLSearchParams(location.search).get("rater") || localStorage.getItem(STORAGE_KEY);
if (remembered) start(remembered);
else askName();

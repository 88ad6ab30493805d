// The page: log in or register, then the task list kept current by live updates.

import { ApiError, Session } from "./api.js";
import { Live, seq } from "./live.js";
import { $, TaskItem, clearErrors, showErrors, showLive } from "./ui.js";

const PAGE_SIZE = 50;
const RECENT_KEPT = 1000; // events remembered to replay over a list read while they arrived
const SEARCH_DELAY_MS = 250;
const REPLACED = "replaced";

const session = new Session();
const live = new Live(session, { event: onEvent, reset: () => reload(), state: showLive });

// What the list shows and what is known. `versions`: the newest version seen of each task, the
// list's and the events' since. `floor`: the `n` of the list's X-Stream-Position; events up to
// it are in the list already.
const list = {
  items: new Map(),
  versions: new Map(),
  floor: 0n,
  count: 0,
  more: false,
  loading: 0,
  recent: [],
};

// ---- the two views ------------------------------------------------------------------------

let view = 0; // counts view changes: work started for one view stops when it is left

function showAuth(notice = "") {
  view += 1;
  live.stop();
  list.loading += 1; // a list still being read belongs to the login that ended
  clearList();
  $("boot").hidden = true;
  $("tasks-view").hidden = true;
  $("account").hidden = true;
  $("live").hidden = true;
  $("auth-view").hidden = false;
  $("auth-notice").textContent = notice;
  $("login-password").value = "";
  $("register-password").value = "";
  $("login-username").focus();
}

async function showTasks() {
  view += 1;
  $("boot").hidden = true;
  $("auth-view").hidden = true;
  $("auth-notice").textContent = "";
  $("whoami").textContent = session.username;
  session
    .call("GET", "/api/me/")
    .then(({ data }) => {
      $("whoami").textContent = data.username; // as registered, whatever case was typed
    })
    .catch(() => {});
  $("account").hidden = false;
  $("live").hidden = false;
  $("tasks-view").hidden = false;
  $("add-title").focus();
  await start();
}

/** The first list, then the stream from its position; retried while the server is away. */
async function start(attempt = 0) {
  const mine = view;
  let position = await reload();
  while (position === REPLACED && mine === view) position = await reload();
  if (mine !== view) return; // logged out meanwhile
  if (position !== null) {
    live.start(position);
    return;
  }
  showLive("waiting");
  const delay = Math.min(30_000, 1000 * 2 ** attempt) * (0.5 + Math.random() / 2);
  setTimeout(() => {
    if (mine === view) start(attempt + 1);
  }, delay);
}

session.addEventListener("ended", (event) => showAuth(event.detail));

// ---- the list -----------------------------------------------------------------------------

function filters() {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
  const done = $("show").value;
  const search = $("search").value;
  if (done) params.set("done", done);
  if (search) params.set("search", search);
  return params;
}

function matches(task) {
  const done = $("show").value;
  if (done && String(task.done) !== done) return false;
  const search = $("search").value.toLowerCase();
  if (!search) return true;
  return task.title.toLowerCase().includes(search) || task.description.toLowerCase().includes(search);
}

/** `a` before `b` in the list's order: newest first (`-created_at`, then `-id`). */
function before(a, b) {
  if (a.created_at !== b.created_at) return a.created_at > b.created_at;
  return a.id > b.id;
}

function clearList() {
  list.items.clear();
  list.versions.clear();
  list.recent = [];
  list.floor = 0n;
  list.count = 0;
  list.more = false;
  $("tasks").replaceChildren();
  $("list-status").textContent = "";
  $("list-error").textContent = "";
  $("more").hidden = true;
}

/** Read the list's first page again (filters changed, or a `reset`): its stream position, null
if it failed, `REPLACED` if a newer read started meanwhile (typing in Search). */
async function reload() {
  const mine = ++list.loading;
  $("tasks").setAttribute("aria-busy", "true");
  let answer;
  try {
    answer = await session.call("GET", `/api/tasks/?${filters()}`);
  } catch (error) {
    if (mine === list.loading && !error.ended) $("list-error").textContent = error.message;
    return null;
  } finally {
    if (mine === list.loading) $("tasks").removeAttribute("aria-busy");
  }
  if (mine !== list.loading) return REPLACED;
  const position = answer.headers.get("X-Stream-Position") || "0-0";
  const recent = list.recent;
  clearList();
  list.floor = seq(position) ?? 0n;
  list.count = answer.data.count;
  list.more = answer.data.next !== null;
  for (const task of answer.data.results) show(task, true);
  // Events that arrived while the list was read, from after its snapshot, apply on top of it.
  list.recent = recent;
  for (const { event, id } of recent) apply(event, id);
  render();
  return position;
}

async function loadMore() {
  const params = filters();
  params.set("offset", String(list.items.size));
  const button = $("more");
  button.disabled = true;
  try {
    const { data } = await session.call("GET", `/api/tasks/?${params}`);
    for (const task of data.results) {
      if ((list.versions.get(task.id) ?? 0) < task.version) show(task, true);
    }
    list.more = data.next !== null;
    render();
  } catch (error) {
    $("list-error").textContent = error.message;
  } finally {
    button.disabled = false;
  }
}

/** Put a task in the list at its place, or update it there; `loaded`: it is on a page just read
(a task that sorts after everything shown is otherwise left to "Show more"). */
function show(task, loaded = false) {
  list.versions.set(task.id, task.version);
  const item = list.items.get(task.id);
  if (item) {
    item.update(task);
    return;
  }
  const node = new TaskItem(task, { toggle, save, remove });
  const ul = $("tasks");
  let next = null;
  for (const other of list.items.values()) {
    if (before(task, other.task) && (next === null || before(other.task, next.task))) {
      next = other;
    }
  }
  if (next === null && list.more && !loaded) {
    list.versions.delete(task.id); // beyond what is loaded: "Show more" reads it as it is then
    return;
  }
  list.items.set(task.id, node);
  ul.insertBefore(node.node, next ? next.node : null);
}

function hide(id) {
  const item = list.items.get(id);
  if (!item) return false;
  const focused = item.node.contains(document.activeElement);
  const after = item.node.nextElementSibling || item.node.previousElementSibling;
  item.node.remove();
  list.items.delete(id);
  if (focused) {
    const next = after && [...list.items.values()].find((other) => other.node === after);
    if (next) next.focus();
    else $("add-title").focus();
  }
  return true;
}

/** A task as the server now has it (an answer to a write, or an event): newer versions only. */
function applyTask(task, deleted = false) {
  if ((list.versions.get(task.id) ?? 0) >= task.version) return;
  list.versions.set(task.id, task.version);
  const shown = list.items.has(task.id);
  if (!deleted && matches(task)) {
    if (!shown) list.count += 1;
    show(task);
  } else if (hide(task.id)) {
    list.count -= 1;
  }
  render();
}

function apply(event, id) {
  const n = seq(id);
  if (n !== null && n <= list.floor) return; // the list shows it already
  applyTask(event.task, event.type === "task.deleted");
}

function onEvent(event, id) {
  list.recent.push({ event, id });
  if (list.recent.length > RECENT_KEPT) list.recent.splice(0, list.recent.length - RECENT_KEPT);
  apply(event, id);
}

function render() {
  const shown = list.items.size;
  const filtered = $("show").value || $("search").value;
  let status;
  if (shown === 0) status = filtered ? "No tasks match." : "No tasks yet. Add one above.";
  else if (list.more) status = `Showing ${shown} of ${Math.max(shown, list.count)} tasks`;
  else status = shown === 1 ? "1 task" : `${shown} tasks`;
  $("list-status").textContent = status;
  $("more").hidden = !list.more;
}

// ---- task actions -------------------------------------------------------------------------

async function toggle(item, done) {
  const { data } = await session.call("PATCH", `/api/tasks/${item.id}/`, { done });
  applyTask(data);
}

async function save(item, fields, version) {
  const headers = { "If-Match": `"${version}"` };
  const { data } = await session.call("PATCH", `/api/tasks/${item.id}/`, fields, headers);
  applyTask(data);
}

async function remove(item) {
  await session.call("DELETE", `/api/tasks/${item.id}/`);
  applyTask({ id: item.id, version: item.task.version + 1 }, true);
}

$("add-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors("add");
  const title = $("add-title").value;
  if (!title.trim()) {
    showErrors("add", new ApiError(400, { title: ["Give the task a title."] }));
    return;
  }
  const button = event.submitter || $("add-form").querySelector("button");
  button.disabled = true;
  try {
    const body = { title, description: $("add-description").value };
    const { data } = await session.call("POST", "/api/tasks/", body);
    applyTask(data);
    $("add-form").reset();
    $("add-title").focus();
    if (!list.items.has(data.id)) $("list-status").textContent = "Added; the filter hides it.";
  } catch (error) {
    if (!error.ended) showErrors("add", error);
  } finally {
    button.disabled = false;
  }
});

let searchTimer = 0;
$("search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(reload, SEARCH_DELAY_MS);
});
$("show").addEventListener("change", () => reload());
$("more").addEventListener("click", loadMore);

// ---- logging in and out -------------------------------------------------------------------

function required(prefix, names) {
  const fields = {};
  for (const name of names) {
    if (!$(`${prefix}-${name}`).value) fields[name] = ["This field is required."];
  }
  if (Object.keys(fields).length === 0) return true;
  showErrors(prefix, new ApiError(400, fields));
  return false;
}

async function submitting(form, work) {
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    await work();
  } finally {
    button.disabled = false;
  }
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  clearErrors("login");
  if (!required("login", ["username", "password"])) return;
  submitting(event.target, async () => {
    try {
      await session.login($("login-username").value, $("login-password").value);
    } catch (error) {
      showErrors("login", error);
      return;
    }
    $("login-form").reset();
    await showTasks();
  });
});

$("register-form").addEventListener("submit", (event) => {
  event.preventDefault();
  clearErrors("register");
  if (!required("register", ["username", "password"])) return;
  const username = $("register-username").value;
  const password = $("register-password").value;
  submitting(event.target, async () => {
    try {
      await session.register(username, password, $("register-email").value);
      await session.login(username, password);
    } catch (error) {
      showErrors("register", error);
      return;
    }
    $("register-form").reset();
    await showTasks();
  });
});

$("logout").addEventListener("click", async () => {
  live.stop();
  await session.logout();
  showAuth("You are logged out.");
});

// ---- start --------------------------------------------------------------------------------

async function boot() {
  if (!session.stored) {
    showAuth();
    return;
  }
  try {
    await session.accessToken(); // the login kept from before this page load
  } catch (error) {
    if (!error.ended) showAuth(`${error.message} Your login is kept: reload to try again.`);
    return; // an ended login has shown the form already
  }
  await showTasks();
}

boot();

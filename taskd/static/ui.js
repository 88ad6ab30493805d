// Rendering. Everything a user typed goes into the page as text (textContent, text nodes,
// attribute values), never as HTML: there is no innerHTML anywhere in this client.

/** An element: `props` are properties (className, type, ...) except `attrs` and `on`. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  const { attrs = {}, on = {}, ...rest } = props;
  Object.assign(node, rest);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const [name, handler] of Object.entries(on)) node.addEventListener(name, handler);
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child); // strings become text nodes
  }
  return node;
}

export const $ = (id) => document.getElementById(id);

/** Show each field's message under it (`prefix-<field>-error`), the rest under the form. */
export function showErrors(prefix, error) {
  clearErrors(prefix);
  const fields = error.fields || {};
  let shown = false;
  let first = null;
  for (const [name, message] of Object.entries(fields)) {
    const slot = $(`${prefix}-${name}-error`);
    const input = $(`${prefix}-${name}`);
    if (slot === null) continue;
    slot.textContent = message;
    shown = true;
    if (input !== null) {
      input.setAttribute("aria-invalid", "true");
      first = first || input;
    }
  }
  if (!shown) $(`${prefix}-form-error`).textContent = error.message;
  if (first !== null) first.focus();
}

export function clearErrors(prefix) {
  for (const slot of document.querySelectorAll(`[id^="${prefix}-"][id$="-error"]`)) {
    slot.textContent = "";
  }
  for (const input of document.querySelectorAll(`[id^="${prefix}-"][aria-invalid]`)) {
    input.removeAttribute("aria-invalid");
  }
}

const LIVE_TEXT = {
  on: "Live updates on",
  connecting: "Connecting…",
  waiting: "Live updates paused, reconnecting…",
  off: "Live updates off",
};

export function showLive(state) {
  $("live").dataset.state = state;
  $("live-text").textContent = LIVE_TEXT[state];
}

/** A field of an edit form: label, control, error slot. */
function field(id, label, control) {
  control.id = id;
  control.setAttribute("aria-describedby", `${id}-error`);
  return el(
    "div",
    { className: "field" },
    el("label", { htmlFor: id, textContent: label }),
    control,
    el("p", { className: "error", id: `${id}-error` }),
  );
}

/**
 * One task in the list. `actions` are `toggle(item, done)`, `save(item, fields)` and
 * `remove(item)`, each returning a promise that rejects with an `ApiError`.
 */
export class TaskItem {
  constructor(task, actions) {
    this.task = task;
    this.actions = actions;
    this.editing = false;
    this.node = el("li", { className: "task" });
    this.#view();
  }

  get id() {
    return this.task.id;
  }

  /** A newer version of the task (from an event or an answer). */
  update(task) {
    const changed = task.version !== this.task.version;
    this.task = task;
    if (this.editing) {
      if (changed) this.note.textContent = "This task was changed elsewhere while you edit it.";
      return;
    }
    this.check.checked = task.done;
    this.title.textContent = task.title;
    this.description.textContent = task.description;
    this.node.classList.toggle("done", task.done);
  }

  focus() {
    (this.editing ? this.titleInput : this.check).focus();
  }

  #view() {
    const id = this.task.id;
    this.editing = false;
    this.check = el("input", {
      type: "checkbox",
      id: `done-${id}`,
      on: { change: () => this.#toggle() },
    });
    this.title = el("label", { className: "title", htmlFor: `done-${id}`, id: `title-${id}` });
    this.description = el("p", { className: "description" });
    this.error = el("p", { className: "error", id: `task-${id}-error`, attrs: { role: "alert" } });
    this.editButton = el("button", {
      type: "button",
      className: "quiet",
      textContent: "Edit",
      on: { click: () => this.#edit() },
    });
    const remove = el("button", {
      type: "button",
      className: "quiet danger",
      textContent: "Delete",
      on: { click: () => this.#remove(remove) },
    });
    this.node.replaceChildren(
      el(
        "div",
        { className: "row" },
        this.check,
        el("div", { className: "text" }, this.title, this.description),
        el("div", { className: "actions" }, this.editButton, remove),
      ),
      this.error,
    );
    this.update(this.task);
  }

  async #toggle() {
    const done = this.check.checked;
    this.error.textContent = "";
    this.check.disabled = true;
    try {
      await this.actions.toggle(this, done);
    } catch (error) {
      this.check.checked = this.task.done;
      this.error.textContent = error.message;
    } finally {
      this.check.disabled = false;
    }
  }

  async #remove(button) {
    this.error.textContent = "";
    button.disabled = true;
    try {
      await this.actions.remove(this);
    } catch (error) {
      this.error.textContent = error.message;
      button.disabled = false;
    }
  }

  #edit() {
    const id = this.task.id;
    const base = this.task.version; // Save sends If-Match with the version being edited
    this.editing = true;
    this.titleInput = el("input", { value: this.task.title, maxLength: 255, required: true });
    const description = el("textarea", { value: this.task.description, rows: 3 });
    this.note = el("p", { className: "notice", attrs: { role: "status" } });
    const formError = el("p", { className: "error", id: `edit-${id}-form-error` });
    formError.setAttribute("role", "alert");
    const form = el(
      "form",
      { className: "edit", noValidate: true, attrs: { "aria-label": `Edit ${this.task.title}` } },
      field(`edit-${id}-title`, "Title", this.titleInput),
      field(`edit-${id}-description`, "Description", description),
      this.note,
      formError,
      el(
        "div",
        { className: "actions" },
        el("button", { type: "submit", textContent: "Save" }),
        el("button", {
          type: "button",
          className: "quiet",
          textContent: "Cancel",
          on: { click: () => this.#close() },
        }),
      ),
    );
    let version = base;
    form.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        this.#close();
      }
    });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const fields = { title: this.titleInput.value, description: description.value };
      const submit = form.querySelector("button[type=submit]");
      submit.disabled = true;
      try {
        await this.actions.save(this, fields, version);
        this.#close();
      } catch (error) {
        if (error.status === 412) {
          version = this.task.version; // a second Save overwrites, knowingly
          error.message = "This task changed elsewhere since you began. Save again to overwrite.";
        }
        showErrors(`edit-${id}`, error);
      } finally {
        submit.disabled = false;
      }
    });
    this.node.replaceChildren(form);
    this.titleInput.focus();
  }

  #close() {
    this.#view();
    this.editButton.focus();
  }
}

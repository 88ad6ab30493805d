// Live updates: one EventSource on /api/stream/, kept open through every kind of trouble.
//
// A browser's EventSource retries by itself only after a dropped connection, and gives up for
// good on any answer but 200 (an expired token, a 502 from the proxy during a restart, a 503
// while a replica has lost Redis). So every error closes it, and this module opens a new one
// after a back-off with jitter, with a fresh token and `last_event_id` set to the last event it
// received: nothing is missed, nothing is applied twice.

const EVENT_TYPES = ["task.created", "task.updated", "task.deleted"];
const BASE_MS = 500; // first retry after 250-500 ms...
const MAX_MS = 30_000; // ...doubling up to 15-30 s
const STABLE_MS = 10_000; // a connection that lasted this long starts the back-off over

/** The `n` of an event id `<n>-0`, as a BigInt (ids go up to 19 digits), or null. */
export function seq(id) {
  const match = /^(0|[1-9][0-9]{0,18})-0$/.exec(id || "");
  return match ? BigInt(match[1]) : null;
}

export class Live {
  #session;
  #handlers;
  #source = null;
  #running = false;
  #last = "0-0";
  #attempt = 0;
  #timer = 0;
  #openedAt = 0;
  #probe = false; // the last attempt never opened: check the token before the next one
  #stale = null; // the token a `reauth` ended the stream for

  /**
   * `handlers.event(event, id)` for each task event, `handlers.reset()` when the list must be
   * read again, `handlers.state(name)` with "on", "connecting", "waiting" or "off".
   */
  constructor(session, handlers) {
    this.#session = session;
    this.#handlers = handlers;
    window.addEventListener("online", () => {
      if (this.#running && this.#source === null) this.#now();
    });
  }

  /** Start from `position` (the list's X-Stream-Position): every later change arrives. */
  start(position) {
    this.stop();
    this.#running = true;
    this.#last = position;
    this.#attempt = 0;
    this.#connect();
  }

  stop() {
    this.#running = false;
    clearTimeout(this.#timer);
    this.#close();
    this.#state("off");
  }

  #now() {
    clearTimeout(this.#timer);
    this.#attempt = 0;
    this.#connect();
  }

  async #connect() {
    this.#timer = 0;
    if (!this.#running) return;
    this.#state("connecting");
    let token;
    try {
      if (this.#probe) await this.#session.call("GET", "/api/me/"); // refreshes on a 401
      token = await this.#session.accessToken();
      if (token === this.#stale) {
        await this.#session.refresh();
        token = await this.#session.accessToken();
      }
    } catch (error) {
      if (error.ended) this.stop();
      else this.#retry();
      return;
    }
    if (!this.#running || this.#source !== null) return;
    const query = new URLSearchParams({ token, last_event_id: this.#last });
    const source = new EventSource(`/api/stream/?${query}`);
    this.#source = source;
    this.#probe = true; // until it opens
    source.addEventListener("open", () => {
      if (source !== this.#source) return;
      this.#probe = false;
      this.#openedAt = Date.now();
      this.#state("on");
    });
    for (const type of EVENT_TYPES) {
      source.addEventListener(type, (message) => this.#event(source, message));
    }
    source.addEventListener("reset", (message) => {
      if (source !== this.#source) return;
      this.#last = message.lastEventId || this.#last;
      this.#handlers.reset();
    });
    source.addEventListener("reauth", () => {
      if (source !== this.#source) return;
      this.#stale = token;
      this.#close();
      this.#now();
    });
    source.addEventListener("error", () => {
      if (source !== this.#source) return;
      if (!this.#probe && Date.now() - this.#openedAt > STABLE_MS) this.#attempt = 0;
      this.#close();
      this.#retry();
    });
  }

  #event(source, message) {
    if (source !== this.#source) return;
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    const n = seq(message.lastEventId);
    const last = seq(this.#last);
    if (n !== null && last !== null && n <= last) return; // seen already
    const gap = n !== null && last !== null && n > last + 1n;
    this.#last = message.lastEventId;
    this.#handlers.event(event, message.lastEventId);
    if (gap) this.#handlers.reset(); // ids have no gaps: something was missed, read again
  }

  #retry() {
    if (!this.#running) return;
    this.#state("waiting");
    const cap = Math.min(MAX_MS, BASE_MS * 2 ** this.#attempt);
    this.#attempt = Math.min(this.#attempt + 1, 10);
    // Half fixed, half random: clients dropped together do not come back together.
    const delay = cap / 2 + (Math.random() * cap) / 2;
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#connect(), delay);
  }

  #close() {
    if (this.#source !== null) {
      this.#source.close();
      this.#source = null;
    }
  }

  #state(name) {
    this.#handlers.state(name);
  }
}

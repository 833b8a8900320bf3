/**
 * @quart-sse/client: a browser client for quart-sse streams that never dead-ends.
 *
 *   import { connect } from '/client.js';
 *   const feed = connect({
 *     url: '/sse',
 *     getTicket: async () => (await (await fetch('/my-app/sse-ticket', { method: 'POST' })).json()).ticket,
 *     onEvent: (ev) => show(ev.type, ev.data),   // ev: { type, id, data (parsed JSON), raw }
 *     onReset: (info) => refetchEverything(),    // history could not cover the gap
 *     onStatus: (s) => badge(s.state),           // connecting | open | waiting | error | closed
 *   });
 *   feed.close();
 *
 * Why not EventSource: it stops for good on any non-200 answer, cannot send a header, never shows comments and
 * reconnects with the same URL, so a single-use ticket or an expired token ends the notifications silently
 * (WHATWG HTML, "Server-sent events", §9.2.3: "fail the connection"). This client reads the stream with fetch()
 * and its own parser of the same format (§9.2.6), so it sees status codes and the service's comments
 * (`: closing token expired`, `: refused <code>`), asks the application for fresh credentials before every
 * (re)connection, and resumes with `lastEventId`.
 *
 * One stream per browser profile and origin: tabs elect a leader with the Web Locks API (the lock is released
 * when its tab closes, so the next tab in line takes over at once) and the leader fans events out over a
 * BroadcastChannel. Every tab keeps the last event id, so a new leader resumes where the old one stopped; recent
 * ids are remembered so that an event seen both from the old leader and from the new stream is delivered once.
 *
 * No dependencies. The rules it follows are documented in docs/clients.md of quart-sse.
 */

export const VERSION = '0.1.0';

/** Events remembered per tab to drop an event delivered twice around a leader change. */
const RECENT_IDS = 1024;
const DEFAULTS = Object.freeze({ retryMs: 3000, maxRetryMs: 30000, idleTimeoutMs: 90000 });
/** Statuses that end a stream for good: the credentials or the URL are wrong, retrying cannot help; 204 is how
 * a server tells an event stream client to stop (WHATWG HTML §9.2.3). */
const FATAL_STATUSES = new Set([204, 400, 403, 404, 405, 410, 414, 431]);

// ------------------------------------------------------------------------------------------------ the wire format
/**
 * An incremental parser of the text/event-stream format (WHATWG HTML §9.2.6). Feed it decoded text as it
 * arrives; it returns what completed: `{kind: 'event', type, data, id}` (`id` null when the event carried no
 * `id:` line), `{kind: 'comment', text}` and `{kind: 'retry', ms}`. Lines end with CRLF, LF or CR, also across
 * chunks.
 */
export class SseParser {
  constructor() {
    this.rest = '';
    this.skipLF = false;  // the previous chunk ended with CR: a LF starting this one belongs to it
    this.type = '';
    this.data = [];
    this.id = null;
    this.hasData = false;
  }

  push(text) {
    const out = [];
    let start = 0;
    if (this.skipLF && text.charCodeAt(0) === 10) start = 1;
    this.skipLF = false;
    const buf = this.rest + text.slice(start);
    start = 0;
    for (let i = 0; i < buf.length; i++) {
      const c = buf.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      this.line(buf.slice(start, i), out);
      if (c === 13) {
        if (i + 1 < buf.length) { if (buf.charCodeAt(i + 1) === 10) i += 1; } else this.skipLF = true;
      }
      start = i + 1;
    }
    this.rest = buf.slice(start);
    return out;
  }

  line(line, out) {
    if (line === '') {  // dispatch (an event without any data line is not dispatched, per the spec)
      if (this.hasData) out.push({ kind: 'event', type: this.type || 'message', data: this.data.join('\n'), id: this.id });
      this.type = ''; this.data = []; this.id = null; this.hasData = false;
      return;
    }
    if (line.charCodeAt(0) === 58) {  // ':' comment
      out.push({ kind: 'comment', text: line.slice(line.charCodeAt(1) === 32 ? 2 : 1) });
      return;
    }
    const colon = line.indexOf(':');
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.charCodeAt(0) === 32) value = value.slice(1);
    if (name === 'data') { this.data.push(value); this.hasData = true; }
    else if (name === 'event') this.type = value;
    else if (name === 'id') { if (!value.includes('\0')) this.id = value; }
    else if (name === 'retry') { if (/^[0-9]+$/.test(value)) out.push({ kind: 'retry', ms: Number(value) }); }
  }
}

// ------------------------------------------------------------------------------------------------ small pieces
/** A bounded set of recently seen ids (oldest forgotten first). */
class RecentIds {
  constructor(size) { this.size = size; this.set = new Set(); }
  has(id) { return this.set.has(id); }
  add(id) {
    this.set.add(id);
    if (this.set.size > this.size) this.set.delete(this.set.values().next().value);
  }
}

function parseJson(text) {
  try { return JSON.parse(text); } catch (e) { return text; }
}

function report(err) {  // a throwing callback must not stop the stream
  if (typeof globalThis.reportError === 'function') globalThis.reportError(err);
  else setTimeout(() => { throw err; });
}

/** Delay before attempt `failures` (1, 2, ...): base × 2^(failures-1), capped, plus up to half of it at random. */
export function backoffMs(baseMs, failures, maxMs, random = Math.random) {
  const d = Math.min(maxMs, baseMs * 2 ** Math.max(0, failures - 1));
  return Math.round(d + random() * d / 2);
}

/** The reason on a `: closing <reason>` comment, as the service writes it (docs/clients.md). */
export const CloseReason = Object.freeze({
  TOKEN_EXPIRED: 'token expired', SHUTDOWN: 'shutdown', DISCONNECTED: 'disconnected by API',
});

function canShare() {
  return typeof navigator !== 'undefined' && navigator.locks && typeof navigator.locks.request === 'function'
    && typeof BroadcastChannel === 'function';
}

function normalize(options) {
  if (!options || typeof options !== 'object') throw new TypeError('connect(options): options must be an object');
  const o = { ...DEFAULTS, ...options };
  if (typeof o.url !== 'string' && !(o.url instanceof URL)) throw new TypeError('connect: url must be a string');
  if (o.getTicket != null && typeof o.getTicket !== 'function') throw new TypeError('connect: getTicket must be a function');
  if (o.getToken != null && typeof o.getToken !== 'function') throw new TypeError('connect: getToken must be a function');
  if (o.getTicket && o.getToken) throw new TypeError('connect: give getTicket or getToken, not both');
  if (o.types != null && !(Array.isArray(o.types) && o.types.every((t) => typeof t === 'string'))) {
    throw new TypeError('connect: types must be an array of strings');
  }
  for (const k of ['retryMs', 'maxRetryMs', 'idleTimeoutMs']) {
    if (typeof o[k] !== 'number' || !(o[k] >= 0)) throw new TypeError(`connect: ${k} must be a number ≥ 0`);
  }
  const base = typeof location !== 'undefined' ? location.href : undefined;
  o.url = new URL(String(o.url), base);
  o.types = o.types ? new Set(o.types) : null;
  o.share = o.share === undefined ? true : o.share;
  o.shareKey = typeof o.share === 'string' ? o.share : o.url.href;
  o.fetch = o.fetch || globalThis.fetch.bind(globalThis);
  return o;
}

// ------------------------------------------------------------------------------------------------ the feed
/**
 * Open a feed: one stream shared by every tab of this origin that opens the same `url` (or `share` key).
 * See index.d.ts for the options and the statuses.
 */
export function connect(options) {
  return new Feed(normalize(options));
}

class Feed {
  #o;
  #status = { state: 'connecting', leader: false, attempt: 0 };
  #lastId;
  #seen = new RecentIds(RECENT_IDS);
  #leader = false;
  #closed = false;
  #channel = null;       // BroadcastChannel, when shared
  #lockAbort = null;     // aborts the pending lock request (a follower that closes)
  #releaseLock = null;   // resolves the held lock (a leader that closes)
  #fetchAbort = null;    // the current request
  #wake = null;          // cuts the current wait short (close, back online)
  #onOnline = () => { if (this.#wake) this.#wake(); };

  constructor(o) {
    this.#o = o;
    this.#lastId = o.lastEventId != null ? String(o.lastEventId) : null;
    if (typeof addEventListener === 'function') addEventListener('online', this.#onOnline);
    if (o.share && canShare()) this.#elect();
    else queueMicrotask(() => this.#lead());
  }

  /** The current status (see index.d.ts): the same object onStatus last received. */
  get status() { return this.#status; }
  /** Id of the last event this tab delivered or saw go by (null before any). */
  get lastEventId() { return this.#lastId; }
  /** True in the one tab that holds the stream. */
  get leader() { return this.#leader; }

  /** Stop for good in this tab. A leader hands the stream over to another tab (which resumes from the last id). */
  close() {
    if (this.#closed) return;
    this.#stop();
    this.#setStatus({ state: 'closed', leader: false, attempt: 0 }, false);
  }

  #stop() {
    this.#closed = true;
    if (this.#fetchAbort) this.#fetchAbort.abort();
    if (this.#wake) this.#wake();
    if (this.#lockAbort) this.#lockAbort.abort();
    if (this.#releaseLock) this.#releaseLock();
    if (this.#channel) this.#channel.close();
    if (typeof removeEventListener === 'function') removeEventListener('online', this.#onOnline);
    this.#leader = false;
  }

  // ---------------------------------------------------------------- tabs: election and fan-out
  #elect() {
    const name = 'quart-sse:' + this.#o.shareKey;
    this.#channel = new BroadcastChannel(name);
    this.#channel.onmessage = (e) => this.#onMessage(e.data);
    this.#lockAbort = new AbortController();
    navigator.locks.request(name, { signal: this.#lockAbort.signal }, () => {
      if (this.#closed) return undefined;
      return new Promise((resolve) => { this.#releaseLock = resolve; this.#lead(); });
    }).catch(() => {});  // AbortError: closed before it led
    this.#channel.postMessage({ kind: 'hello' });  // the leader answers with its status
  }

  #onMessage(msg) {
    if (this.#closed || !msg || typeof msg !== 'object') return;
    if (msg.kind === 'event') this.#deliver(msg.event);
    else if (msg.kind === 'hello' && this.#leader) this.#post({ kind: 'status', status: this.#status, lastEventId: this.#lastId });
    else if (msg.kind === 'status' && !this.#leader) {
      if (this.#lastId === null && msg.lastEventId != null) this.#lastId = msg.lastEventId;
      const status = { ...msg.status, leader: false };
      if (status.state === 'error') this.#stop();  // the leader's error is the feed's: no tab retries it
      this.#setStatus(status, false);
    }
  }

  #post(msg) {
    if (this.#channel && !this.#closed) this.#channel.postMessage(msg);
  }

  #setStatus(status, share = true) {
    this.#status = Object.freeze(status);
    if (share && this.#leader) this.#post({ kind: 'status', status: this.#status, lastEventId: this.#lastId });
    if (this.#o.onStatus) {
      try { this.#o.onStatus(this.#status); } catch (err) { report(err); }
    }
  }

  /** One event from the stream (leader) or from the leader (follower): once per id, in the order received. */
  #deliver(ev) {
    if (ev.id !== null && ev.id !== '') {
      if (this.#seen.has(ev.id)) return;
      this.#seen.add(ev.id);
      this.#lastId = ev.id;
    }
    if (ev.type === 'reset' && ev.id === null) {
      if (this.#o.onReset) {
        try { this.#o.onReset(parseJson(ev.data)); } catch (err) { report(err); }
      }
      return;
    }
    const types = this.#o.types;
    if (types ? !types.has(ev.type) : ev.type === 'ping') return;
    if (this.#o.onEvent) {
      try { this.#o.onEvent({ type: ev.type, id: ev.id, data: parseJson(ev.data), raw: ev.data }); } catch (err) { report(err); }
    }
  }

  // ---------------------------------------------------------------- the leader: one stream, reconnected forever
  #lead() {
    if (this.#closed) { if (this.#releaseLock) this.#releaseLock(); return; }
    this.#leader = true;
    this.#run().catch((err) => this.#fail({ error: 'client_error', message: String(err && err.message || err) }));
  }

  #fail(detail) {
    if (this.#closed) return;
    this.#setStatus({ state: 'error', leader: this.#leader, attempt: 0, ...detail });
    this.#stop();
  }

  async #run() {
    const o = this.#o;
    let failures = 0;         // attempts in a row that did not open a stream
    let authRetried = false;  // a 401 was answered with one fresh credential already
    let serverRetry = null;   // the last `retry:` the service sent (ms)
    while (!this.#closed) {
      this.#setStatus({ state: 'connecting', leader: true, attempt: failures + 1 });
      let credential;
      try {
        credential = o.getTicket ? await o.getTicket() : o.getToken ? await o.getToken() : undefined;
      } catch (err) {  // the application's ticket endpoint is down: the same as a network error
        failures += 1;
        await this.#waitBeforeRetry(backoffMs(serverRetry ?? o.retryMs, failures, o.maxRetryMs), failures,
          'credentials', { message: String(err && err.message || err) });
        continue;
      }
      if (this.#closed) return;
      if ((o.getTicket || o.getToken) && (credential == null || credential === '')) {
        this.#fail({ error: 'no_credentials', message: (o.getTicket ? 'getTicket' : 'getToken') + ' gave no credential' });
        return;
      }
      const url = new URL(o.url);
      const headers = { Accept: 'text/event-stream' };  // a CORS-safelisted header: no preflight with a ticket
      if (o.getTicket) url.searchParams.set('ticket', credential);
      if (o.getToken) headers.Authorization = 'Bearer ' + credential;
      // the query parameter rather than the Last-Event-ID header: no CORS preflight for it
      if (this.#lastId !== null) url.searchParams.set('lastEventId', this.#lastId);
      const abort = new AbortController();
      this.#fetchAbort = abort;
      let resp;
      try {
        resp = await o.fetch(url, { headers, cache: 'no-store', credentials: o.credentials || 'same-origin',
          signal: abort.signal });
      } catch (err) {
        if (this.#closed) return;
        failures += 1;
        await this.#waitBeforeRetry(backoffMs(serverRetry ?? o.retryMs, failures, o.maxRetryMs), failures,
          'network', { message: String(err && err.message || err) });
        continue;
      }
      const type = (resp.headers.get('content-type') || '').split(';')[0].trim();
      if (resp.status === 200 && type === 'text/event-stream') {
        // the `retry:` that opens a stream is the base of later delays; the one on a closing or a refusal (already
        // jittered by the service) is for that one wait
        const end = await this.#read(resp, abort, (ms) => { serverRetry = ms; });
        if (this.#closed) return;
        if (end.opened) { failures = 0; authRetried = false; }
        if (end.closing === CloseReason.TOKEN_EXPIRED) continue;  // not a failure: fresh credentials, resume now
        if (end.closing !== null) {  // the service ended it (shutdown, disconnected...): come back when it says
          await this.#waitBeforeRetry(end.retry ?? serverRetry ?? o.retryMs, 0, 'closed', { message: end.closing });
          continue;
        }
        failures = end.opened ? 1 : failures + 1;
        const refused = end.refused !== null;
        const base = (refused ? end.retry : null) ?? serverRetry ?? o.retryMs;
        await this.#waitBeforeRetry(backoffMs(base, failures, o.maxRetryMs), failures,
          refused ? 'refused' : end.idle ? 'idle' : 'network', refused ? { error: end.refused } : {});
        continue;
      }
      const body = await resp.text().catch(() => '');
      const detail = { httpStatus: resp.status, ...errorOf(body) };
      if (resp.status === 401 && !authRetried) { authRetried = true; continue; }  // one fresh credential
      if (resp.status === 401 || FATAL_STATUSES.has(resp.status)) { this.#fail(detail); return; }
      // 429, 503, other 5xx, a proxy's page: it passes by itself
      failures += 1;
      const after = Number(resp.headers.get('retry-after'));
      const base = Number.isFinite(after) && after > 0 ? after * 1000 : serverRetry ?? o.retryMs;
      await this.#waitBeforeRetry(backoffMs(base, failures, o.maxRetryMs), failures, 'http', detail);
    }
  }

  /** Read one stream to its end: `{opened, closing, refused, idle, retry}` (`retry`: the last `retry:` seen);
   * `onOpen(retry)` gets the `retry:` seen before the stream opened. */
  async #read(resp, abort, onOpen) {
    const o = this.#o;
    const end = { opened: false, closing: null, refused: null, idle: false, retry: null };
    const parser = new SseParser();
    const decoder = new TextDecoder();
    const reader = resp.body.getReader();
    let idleTimer = null;
    const armIdle = () => {
      if (!o.idleTimeoutMs) return;
      clearTimeout(idleTimer);
      idleTimer = setTimeout(() => { end.idle = true; abort.abort(); }, o.idleTimeoutMs);
    };
    const open = () => {
      if (end.opened) return;
      end.opened = true;
      if (end.retry !== null) onOpen(end.retry);
      this.#setStatus({ state: 'open', leader: true, attempt: 0 });
    };
    armIdle();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        armIdle();
        for (const item of parser.push(decoder.decode(value, { stream: true }))) {
          if (item.kind === 'retry') end.retry = item.ms;
          else if (item.kind === 'comment') {
            if (item.text === 'connected') open();
            else if (item.text.startsWith('closing ')) end.closing = item.text.slice(8);
            else if (item.text.startsWith('refused ')) end.refused = item.text.slice(8);
          } else {
            open();
            const ev = { type: item.type, id: item.id, data: item.data };
            this.#deliver(ev);
            this.#post({ kind: 'event', event: ev });
          }
        }
      }
    } catch (err) {
      // aborted (close, idle) or the connection broke: the caller decides from `end`
    } finally {
      clearTimeout(idleTimer);
      if (this.#fetchAbort === abort) this.#fetchAbort = null;
    }
    return end;
  }

  #waitBeforeRetry(ms, attempt, reason, detail) {
    if (this.#closed) return Promise.resolve();
    this.#setStatus({ state: 'waiting', leader: true, attempt, retryInMs: ms, reason, ...detail });
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      const self = this;
      function done() { clearTimeout(timer); if (self.#wake === done) self.#wake = null; resolve(); }
      this.#wake = done;
    });
  }
}

function errorOf(body) {
  const parsed = parseJson(body);
  if (parsed && typeof parsed === 'object' && typeof parsed.error === 'string') {
    return { error: parsed.error, message: typeof parsed.message === 'string' ? parsed.message : '' };
  }
  return {};
}

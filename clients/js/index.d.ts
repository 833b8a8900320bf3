/** Type declarations of @quart-sse/client (index.js). */

/** The version of this client; equal to the quart-sse service version it ships with. */
export declare const VERSION: string;

/** One event of the stream, as delivered to `onEvent`. */
export interface FeedEvent<T = unknown> {
  /** The SSE event type (`event:` line; `message` when the event had none). */
  type: string;
  /** The event id (`id:` line), or null for an event published without one (live only, cannot be resumed). */
  id: string | null;
  /** `raw` parsed as JSON; the raw text when it is not JSON. */
  data: T;
  /** The `data:` text as received. */
  raw: string;
}

/** What the service says in a `reset` event: history could not cover the gap, refetch your state. */
export interface ResetInfo {
  /** e.g. `unknown id`, `trimmed`, `expired` (see docs/history.md). */
  reason: string;
  /** The id the client resumed from. */
  last_event_id: string | null;
  [key: string]: unknown;
}

/**
 * - `connecting`: fetching credentials and opening the stream;
 * - `open`: the stream is live;
 * - `waiting`: the stream ended or was refused; the next attempt starts in `retryInMs` (see `reason`);
 * - `error`: stopped for good (401 twice in a row, 403, another 4xx, no credential): the app must act;
 * - `closed`: `close()` was called in this tab.
 */
export type FeedState = 'connecting' | 'open' | 'waiting' | 'error' | 'closed';

/**
 * Why the feed waits: `closed` (the service ended the stream: shutdown, disconnected by API; `message` says which),
 * `refused` (the service refused for a moment: `error` is the code, e.g. `too_many_connections`), `http` (429,
 * 503, another 5xx, a proxy's answer: `httpStatus`), `network` (no answer, or the connection broke), `idle` (no
 * byte for `idleTimeoutMs`), `credentials` (getTicket/getToken threw).
 */
export type WaitReason = 'closed' | 'refused' | 'http' | 'network' | 'idle' | 'credentials';

export interface FeedStatus {
  state: FeedState;
  /** True in the tab that holds the stream; the other tabs mirror its status with `leader: false`. */
  leader: boolean;
  /** Attempts in a row that did not open a stream (0 once open). */
  attempt: number;
  /** `waiting` only: milliseconds until the next attempt. */
  retryInMs?: number;
  /** `waiting` only. */
  reason?: WaitReason;
  /** The HTTP status of a refusal (`error`, or `waiting` with reason `http`). */
  httpStatus?: number;
  /** The service's error code (`unauthorized`, `forbidden`, `too_many_connections`, ...) or `no_credentials`. */
  error?: string;
  /** Human-readable detail. */
  message?: string;
}

export interface ConnectOptions<T = unknown> {
  /** The stream URL, e.g. `/sse` or `https://notify.example.com/sse`. */
  url: string | URL;
  /**
   * Returns a fresh single-use ticket (from `POST /sse/ticket`, usually via your own backend); called before
   * every connection, never reused. Return null to stop with status `error` (e.g. the user logged out);
   * throwing counts as a passing failure (retried with backoff).
   */
  getTicket?: () => string | null | undefined | Promise<string | null | undefined>;
  /** Returns a token sent as `Authorization: Bearer`; called before every connection. Same rules as getTicket. */
  getToken?: () => string | null | undefined | Promise<string | null | undefined>;
  /** Every event of the listed `types` (default: every type but `ping`), once, in order, in every tab. */
  onEvent?: (event: FeedEvent<T>) => void;
  /** The service sent `reset`: events may have been missed since `lastEventId`; refetch your state. */
  onReset?: (info: ResetInfo) => void;
  /** Every status change (see FeedStatus). */
  onStatus?: (status: FeedStatus) => void;
  /** Only these event types reach onEvent; include `ping` to see keep-alives. Default: all but `ping`. */
  types?: string[];
  /** Resume after this id on the first connection (e.g. kept in sessionStorage). */
  lastEventId?: string | null;
  /**
   * Share one stream between all tabs of this origin (Web Locks + BroadcastChannel). Default true: tabs that open
   * the same `url` share. A string names the group instead, e.g. the user id when one origin may hold several
   * users' pages. false: this tab has a stream of its own.
   */
  share?: boolean | string;
  /** Delay before the first retry until the service sends `retry:` (ms, default 3000). */
  retryMs?: number;
  /** Cap of the exponential backoff (ms, default 30000; the random jitter adds up to half of it). */
  maxRetryMs?: number;
  /** Reconnect when no byte arrived for this long (ms, default 90000; keep it above the service's PING_INTERVAL). 0: never. */
  idleTimeoutMs?: number;
  /** fetch() credentials mode (default `same-origin`); `include` for a cookie sent to another origin. */
  credentials?: RequestCredentials;
  /** A fetch() of your own (tests, instrumentation). */
  fetch?: typeof fetch;
}

export interface Feed {
  /** The status onStatus last received. */
  readonly status: FeedStatus;
  /** Id of the last event this tab saw (null before any). */
  readonly lastEventId: string | null;
  /** True in the one tab that holds the stream. */
  readonly leader: boolean;
  /** Stop in this tab; a leader hands the stream over to another tab, which resumes from the last id. */
  close(): void;
}

/** Open a feed; see ConnectOptions. Throws TypeError on invalid options. */
export declare function connect<T = unknown>(options: ConnectOptions<T>): Feed;

/** The reasons of a `: closing <reason>` comment the service writes before it ends a stream. */
export declare const CloseReason: Readonly<{
  TOKEN_EXPIRED: 'token expired';
  SHUTDOWN: 'shutdown';
  DISCONNECTED: 'disconnected by API';
}>;

/** Delay (ms) before attempt `failures` (1, 2, ...): base × 2^(failures−1), capped at maxMs, plus up to half of it. */
export declare function backoffMs(baseMs: number, failures: number, maxMs: number, random?: () => number): number;

/** One item of the text/event-stream format, as SseParser returns them. */
export type SseItem =
  | { kind: 'event'; type: string; data: string; id: string | null }
  | { kind: 'comment'; text: string }
  | { kind: 'retry'; ms: number };

/** An incremental text/event-stream parser (WHATWG HTML §9.2.6). */
export declare class SseParser {
  constructor();
  /** Feed decoded text; returns the items it completed. */
  push(text: string): SseItem[];
}

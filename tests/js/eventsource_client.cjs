// One npm `eventsource` client in Node, as a backend or a CLI uses it: reports what it sees as JSON lines.
//
//   node eventsource_client.cjs <node_modules> <v2|v4> <url> <token> [event type...]
//
// v2 is `eventsource@2.0.2` (Node's http module; `headers` option); v4 the current, fetch-based package (the token
// goes in through its `fetch` option). Each line on stdout is one of
//   {"t": <epoch ms>, "kind": "open", "readyState": n}
//   {"t": ..., "kind": "error", "readyState": n, "status": <HTTP status or null>}
//   {"t": ..., "kind": "state", "readyState": n}             (just after each error)
//   {"t": ..., "kind": "event", "type": "...", "data": "...", "lastEventId": "..."}
// The process runs until it is killed; a client that gave up (readyState CLOSED) says so and stays idle, so that
// the test sees it did not come back.
'use strict'

const path = require('path')
const { createRequire } = require('module')

const [modules, version, url, token, ...types] = process.argv.slice(2)
const load = createRequire(path.join(modules, 'noop.js'))
const say = (entry) => process.stdout.write(JSON.stringify({ t: Date.now(), ...entry }) + '\n')

let es
if (version === 'v2') {
  const EventSource = load('eventsource-v2')
  es = new EventSource(url, { headers: { Authorization: 'Bearer ' + token } })
} else if (version === 'v4') {
  const { EventSource } = load('eventsource')
  es = new EventSource(url, {
    fetch: (input, init) => fetch(input, { ...init, headers: { ...init.headers, Authorization: 'Bearer ' + token } })
  })
} else {
  throw new Error('unknown version ' + version)
}

es.addEventListener('open', () => say({ kind: 'open', readyState: es.readyState }))
es.addEventListener('error', (e) => {
  say({ kind: 'error', readyState: es.readyState, status: e.status ?? e.code ?? null })
  // v2 closes only after it dispatched the error: the state once the dispatch is over says whether it gave up
  setTimeout(() => say({ kind: 'state', readyState: es.readyState }), 0)
})
for (const type of ['message', 'reset', ...types]) {
  es.addEventListener(type, (e) => say({ kind: 'event', type: e.type, data: e.data, lastEventId: e.lastEventId }))
}
process.on('SIGTERM', () => { es.close(); process.exit(0) })
setInterval(() => {}, 1 << 30) // a client that gave up has nothing left to do, and must still be there to tell

#!/usr/bin/env bash
# A walk through the HTTP API with curl; the HTTPie equivalent of each call is in the comment above it.
#
#   make run                            # in another terminal (or: docker compose up)
#   bash docs/examples/curl.sh
#
# Tokens are signed with the service's JWT_SECRET by its own CLI (in real life your auth service issues them), so
# run this where the service's .env or environment is. Or pass USER_TOKEN and ADMIN_TOKEN yourself.
set -euo pipefail

BASE_URL=${BASE_URL:-http://127.0.0.1:8080}
APP=${APP:-my-app}
USER_ID=${USER_ID:-alice}
PYTHON=${PYTHON:-python3}

# user token (sub = user, iss = app); a backend token with the publish and connections scopes
USER_TOKEN=${USER_TOKEN:-$("$PYTHON" -m quart_sse token --sub "$USER_ID" --iss "$APP" --ttl 600)}
ADMIN_TOKEN=${ADMIN_TOKEN:-$("$PYTHON" -m quart_sse token --sub backend --iss "$APP" --scope "publish connections" --ttl 600)}

step() { printf '\n== %s\n' "$*"; }

step "health"
# http :8080/health
curl -sS "$BASE_URL/health"; echo

step "open the stream in the background (curl -N: no buffering)"
# http --stream :8080/sse "Authorization:Bearer $USER_TOKEN"
STREAM_OUT=$(mktemp)
trap 'rm -f "$STREAM_OUT"' EXIT
curl -sS -N --max-time 30 -H "Authorization: Bearer $USER_TOKEN" "$BASE_URL/sse" >"$STREAM_OUT" &
STREAM_PID=$!

step "wait until the stream is listed as a connection"
# http :8080/connections/my-app/alice "Authorization:Bearer $USER_TOKEN"
for _ in $(seq 1 50); do
  listing=$(curl -sS -H "Authorization: Bearer $USER_TOKEN" "$BASE_URL/connections/$APP/$USER_ID")
  [ "$listing" != "{}" ] && break
  sleep 0.1
done
echo "$listing"

step "publish to the user"
# http POST :8080/publish/my-app/alice "Authorization:Bearer $ADMIN_TOKEN" type=notification data:='{"title":"Hello"}'
curl -sS -X POST -H "Authorization: Bearer $ADMIN_TOKEN" -H "Content-Type: application/json" \
  -d '{"type": "notification", "data": {"title": "Hello", "body": "from curl"}}' \
  "$BASE_URL/publish/$APP/$USER_ID"; echo

step "broadcast to every user of the app"
# http POST :8080/publish/my-app "Authorization:Bearer $ADMIN_TOKEN" type=announcement data:='{"text":"hi all"}'
curl -sS -X POST -H "Authorization: Bearer $ADMIN_TOKEN" -H "Content-Type: application/json" \
  -d '{"type": "announcement", "data": {"text": "to every connected user of the app"}}' \
  "$BASE_URL/publish/$APP"; echo

step "every connection of the app (scope connections)"
# http :8080/connections/my-app "Authorization:Bearer $ADMIN_TOKEN"
curl -sS -H "Authorization: Bearer $ADMIN_TOKEN" "$BASE_URL/connections/$APP"; echo

step "a single-use ticket, for browsers that should not put a long-lived token in a URL"
# http POST :8080/sse/ticket "Authorization:Bearer $USER_TOKEN"
curl -sS -X POST -H "Authorization: Bearer $USER_TOKEN" "$BASE_URL/sse/ticket"; echo

step "disconnect the user everywhere (scope connections): the stream above ends"
# http DELETE :8080/connections/my-app/alice "Authorization:Bearer $ADMIN_TOKEN"
curl -sS -X DELETE -H "Authorization: Bearer $ADMIN_TOKEN" "$BASE_URL/connections/$APP/$USER_ID"; echo

wait "$STREAM_PID" || true
step "what the stream received"
cat "$STREAM_OUT"

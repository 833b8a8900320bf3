"""The one pattern every app and user id must match (docs/security.md).

Ids are spliced into Redis channel and key names (`{app}:channel:{user}`), so a `:` or a glob character in an id
could name another tenant's channel; the pattern admits neither.
"""

from __future__ import annotations

import re

ID_PATTERN = r"^[A-Za-z0-9._@|+-]{1,128}$"
_ID_RE = re.compile(r"[A-Za-z0-9._@|+-]{1,128}")


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None

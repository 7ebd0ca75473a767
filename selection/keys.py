"""Safe mapping from arbitrary model ids to storage keys (no traversal, no collisions)."""

from __future__ import annotations

import hashlib
import re

from selection.errors import ConfigError

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_ID_LENGTH = 4096


def model_key(model_id: str) -> str:
    """Return a path-safe key for `model_id`.

    The key is a readable slug (ASCII letters, digits, '_' and '-', at most 48 chars)
    plus 16 hex digits of the id's sha256, so distinct ids never share a key and no
    key contains '/', '.', '..' or starts with anything but a slug character.
    A bad id (not a string, blank, too long, not valid Unicode) is a ConfigError (a ValueError too).
    """
    if not isinstance(model_id, str) or not model_id.strip():
        raise ConfigError(f"model id must be a non-empty string, got {model_id!r}")
    if len(model_id) > MAX_ID_LENGTH:
        raise ConfigError(f"model id {model_id[:40]!r}... is {len(model_id)} characters long, "
                          f"more than {MAX_ID_LENGTH}")
    check_unicode(model_id)
    slug = _UNSAFE.sub("_", model_id).strip("_-")[:48] or "model"
    digest = hashlib.sha256(model_id.encode("utf-8")).hexdigest()[:16]
    return f"{slug}-{digest}"


def check_unicode(model_id: str) -> None:
    """Refuse an id that is not valid Unicode text: a lone surrogate ("\\udcff", from bytes that are
    not UTF-8 in argv, or escaped in JSON) has no UTF-8 form, for its key or a Parquet row."""
    try:
        model_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"model id {model_id[:80]!r} is not valid Unicode text (a lone surrogate, "
                          f"e.g. from bytes that are not UTF-8)") from None


def shard_of(key: str) -> str:
    """Two hex digits of the key's digest: spreads objects over 256 prefixes."""
    return key[-16:-14]

"""The secret that makes a token cache data to verify, not data to trust.

Every record of the token cache (a block's record, a document index, a stream position) carries an HMAC-SHA256
made with this user's cache key over the record, the place it is stored under (stream key and block number, or the
file key) and the cache format. Someone who can write into a shared cache folder but does not hold the key cannot
make a record this user accepts: an edited record, an index naming another file, a block copied under another
number all fail the check, are counted, and are tokenized again from the source.

    $GPTDIST_CACHE_KEY_FILE                      the key file, when set (a path shared by the users or nodes that
                                                 are meant to share a cache; it must not be world-readable)
    $XDG_CONFIG_HOME/gptdist/cache.key           otherwise (~/.config/gptdist/cache.key), made on first use:
                                                 32 random bytes, mode 0600
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Optional

from gptdist.errors import UserError

FORMAT = "gptdist-token-cache-2"
_KEY: Optional[bytes] = None
_KEY_FROM: Optional[str] = None


def key_path() -> Path:
    if os.environ.get("GPTDIST_CACHE_KEY_FILE"):
        return Path(os.environ["GPTDIST_CACHE_KEY_FILE"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "gptdist" / "cache.key"


def cache_key() -> bytes:
    """This user's key, read once per process (made when missing). Raises UserError for a key others can read."""
    global _KEY, _KEY_FROM
    path = key_path()
    if _KEY is not None and _KEY_FROM == str(path):
        return _KEY
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
        except FileExistsError:
            pass  # another rank made it a moment ago
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"token cache key {path} cannot be read ({exc.strerror or exc}); fix its permissions or set "
                        "GPTDIST_CACHE_KEY_FILE to a key file of your own") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise UserError(f"token cache key {path} is readable or writable by others (mode {stat.S_IMODE(mode):o}); "
                        f"chmod 600 {path} (or 640 to share it with a group)")
    if len(data) < 16:
        raise UserError(f"token cache key {path} holds {len(data)} bytes, fewer than 16; delete it (a new one is "
                        "made) or point GPTDIST_CACHE_KEY_FILE at a good one")
    _KEY, _KEY_FROM = data, str(path)
    return data


def seal(where: str, record: Any, data: bytes = b"") -> str:
    """The MAC of a record stored under `where` (and of the bytes beside it, if any)."""
    mac = hmac.new(cache_key(), digestmod=hashlib.sha256)
    for part in (FORMAT.encode(), where.encode(), json.dumps(record, sort_keys=True).encode(), data):
        mac.update(len(part).to_bytes(8, "little"))
        mac.update(part)
    return mac.hexdigest()


def verify(where: str, record: Any, mac: object, data: bytes = b"") -> bool:
    return isinstance(mac, str) and hmac.compare_digest(seal(where, record, data), mac)

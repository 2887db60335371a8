"""Secrets out of everything autotune shows: the one redaction of passwords and tokens.

A storage URL or a tracking URI may carry a secret, in any of these forms:
- the password of a URL's user: `postgresql://user:pw@host/db`, `redis://:pw@host:6379/0`,
  `http://user:token@mlflow-host:5000`, for every scheme (`postgresql+psycopg://`, `rediss://`,
  ...); a password may hold `:`, `/` and even `@`, so everything up to the last `@` before the
  host goes; for http(s), a user with no password (`https://token@host`) is taken for a token;
- a query-string or keyword parameter whose name says secret: `?password=pw`, `&token=t`,
  `sslpassword=pw`, `X-Amz-Signature=...`, `api_key=...` (see SECRET_NAME);
- a dict item whose key says secret, as a repr of keyword arguments shows it:
  `{'password': 'pw'}`.

`redact` replaces each secret by MASK in any text, wherever it is in it; a user name, the host,
the port, the database and every other parameter stay. What it is applied to: every error line the
CLI prints, every line that names a URL, every MLflow param and tag (`redact_params`, which also
masks the value of a param whose own name says secret, such as `data.kwargs.password`), the
storage URL in recommended.yaml, a failed trial's reason. Pure: no torch, no optuna.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
# a name that says its value is secret: password, passwd, sslpassword, passphrase, pwd, secret,
# client_secret, token, access_token, credential, signature, api_key, apiKey, and a name that
# ends in the word key, auth or sig (private_key, auth, sig; not monkey, key_dim or sslkey)
SECRET_NAME = re.compile(
    r"pass|pwd|secret|token|credential|signature|api[-_]?key|(?<![a-z])(?:key|auth|sig)$",
    re.IGNORECASE,
)
# name=value, in a query string or a keyword list (libpq's `host=db password='p w'`): the value
# ends at whitespace, &, ; or #, or is quoted
_PARAMETER = re.compile(r"""(?<![\w.-])([A-Za-z_][\w.-]*=)('[^']*'|"[^"]*"|[^\s&;#'"]+)""")
# 'name': value, as a dict's repr shows a keyword argument (`{'password': 'pw'}`)
_ITEM = re.compile(
    r"""(?<![\w.-])(['"])([A-Za-z_][\w.-]*)\1(\s*:\s*)('[^']*'|"[^"]*"|[^\s,}'"]+)"""
)
# the characters of a URL's scheme, and the first one that ends the user of `scheme://user...`
_SCHEME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
_USER_END = re.compile(r"[:/?#@]")
_SPACE = re.compile(r"\s")
# schemes whose user alone may be a token (`https://ghp_x@host`, as git and pip take one)
_TOKEN_USER_SCHEMES = {"http", "https"}


def redact(text: str) -> str:
    """`text` with every password and token in it replaced by MASK:
    postgresql://user:pw@host/db?sslpassword=x -> postgresql://user:***@host/db?sslpassword=***

    In time linear in the text's length, whatever it holds: it is applied to whole error
    messages and params, which may quote a long value."""
    text = _hide_userinfo(text)
    text = _PARAMETER.sub(_parameter, text)
    return _ITEM.sub(_item, text)


def _hide_userinfo(text: str) -> str:
    """scheme://user:password@host with the password masked, the user (maybe empty) kept; the
    password goes up to the last @ of its word (it may hold `:`, `/` and `@`; an @ in the path is
    taken for the password's end, which hides too much rather than too little). For http(s), a
    user with no password, `https://token@host`, is masked whole.

    A scan rather than one regex: a regex that tries every `://` and looks for the word's last
    `@` from each is quadratic in a text of many of them."""
    pieces: list[str] = []
    copied = 0  # text[:copied] is in pieces
    space = -1  # the first white space at or after `start`, once found
    start = text.find("://")
    while start != -1:
        scheme_start = start
        while scheme_start > copied and text[scheme_start - 1] in _SCHEME:
            scheme_start -= 1
        while scheme_start < start and not text[scheme_start].isalpha():
            scheme_start += 1
        scheme = text[scheme_start:start].lower()
        user = start + 3
        if space < user:
            found = _SPACE.search(text, user)
            space = found.start() if found else len(text)
        following = text.find("://", user, space)
        end = space if following == -1 else following
        user_end = _USER_END.search(text, user, end)
        if scheme and user_end is not None:
            at = text.rfind("@", user_end.start(), end)
            mark = user_end[0]
            if mark == ":" and at != -1:
                pieces += [text[copied : user_end.start() + 1], MASK]
                copied = at
            elif mark == "@" and scheme in _TOKEN_USER_SCHEMES and user_end.start() > user:
                pieces += [text[copied:user], MASK]
                copied = user_end.start()
        start = following if following != -1 else text.find("://", space)
    pieces.append(text[copied:])
    return "".join(pieces)


def _parameter(match: re.Match[str]) -> str:
    name = match[1]
    return f"{name}{MASK}" if SECRET_NAME.search(name[:-1]) else match[0]


def _item(match: re.Match[str]) -> str:
    quote, name, colon = match[1], match[2], match[3]
    return f"{quote}{name}{quote}{colon}'{MASK}'" if SECRET_NAME.search(name) else match[0]


def is_secret_name(name: str) -> bool:
    """Whether a dotted name's last part says its value is secret (`data.kwargs.api_token`)."""
    return SECRET_NAME.search(name.rsplit(".", 1)[-1]) is not None


def redact_params(params: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params or tags as the strings MLflow keeps, redacted: a value whose name says
    secret is MASK whole, every other value goes through `redact`."""
    return {
        key: MASK if is_secret_name(key) else redact(str(value)) for key, value in params.items()
    }

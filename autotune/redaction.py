"""Secrets out of everything autotune shows: the one redaction of passwords and tokens.

A storage URL or a tracking URI may carry a secret, in any of these forms:
- the password of a URL's user: `postgresql://user:pw@host/db`, `redis://:pw@host:6379/0`,
  `http://user:token@mlflow-host:5000`, for every scheme (`postgresql+psycopg://`, `rediss://`,
  ...); a password may hold `:`, `/` and even `@`, so everything up to the last `@` before the
  host goes;
- a query-string or keyword parameter whose name says secret: `?password=pw`, `&token=t`,
  `sslpassword=pw`, `X-Amz-Signature=...`, `api_key=...` (see SECRET_NAME).

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
# scheme://user:password@: the user (maybe empty) kept, the password up to the last @ of the
# word dropped (a URL that ends at whitespace; an @ in the path is taken for the password's end,
# which hides too much rather than too little)
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:)(?:[^\s@]*@)+")
# name=value, in a query string or a keyword list (libpq's `host=db password='p w'`): the value
# ends at whitespace, &, ; or #, or is quoted
_PARAMETER = re.compile(r"""(?<![\w.-])([A-Za-z_][\w.-]*=)('[^']*'|"[^"]*"|[^\s&;#'"]+)""")


def redact(text: str) -> str:
    """`text` with every password and token in it replaced by MASK:
    postgresql://user:pw@host/db?sslpassword=x -> postgresql://user:***@host/db?sslpassword=***"""
    text = _USERINFO.sub(lambda m: f"{m[1]}{MASK}@", text)
    return _PARAMETER.sub(_parameter, text)


def _parameter(match: re.Match[str]) -> str:
    name = match[1]
    return f"{name}{MASK}" if SECRET_NAME.search(name[:-1]) else match[0]


def is_secret_name(name: str) -> bool:
    """Whether a dotted name's last part says its value is secret (`data.kwargs.api_token`)."""
    return SECRET_NAME.search(name.rsplit(".", 1)[-1]) is not None


def redact_params(params: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params or tags as the strings MLflow keeps, redacted: a value whose name says
    secret is MASK whole, every other value goes through `redact`."""
    return {
        key: MASK if is_secret_name(key) else redact(str(value)) for key, value in params.items()
    }

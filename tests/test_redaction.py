"""autotune.core.redaction: every form of secret in a URL or a text, and the MLflow params."""

from __future__ import annotations

import pytest

from autotune.core.redaction import MASK, SECRET_NAME, is_secret_name, redact, redact_params
from autotune.core.spec import Spec
from autotune.search.run_fields import flatten

SECRET = "s3cr3t-Pw"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # a user's password, in storage URLs of every scheme; the user, host, port, database stay
        (
            f"postgresql://postgres:{SECRET}@127.0.0.1:5432/db",
            "postgresql://postgres:***@127.0.0.1:5432/db",
        ),
        (f"postgresql+psycopg://me:{SECRET}@db/x", "postgresql+psycopg://me:***@db/x"),
        (f"mysql://root:{SECRET}@127.0.0.1/optuna", "mysql://root:***@127.0.0.1/optuna"),
        (f"redis://default:{SECRET}@host:6379/0", "redis://default:***@host:6379/0"),
        (f"rediss://u:{SECRET}@host:6380/0", "rediss://u:***@host:6380/0"),
        # a password with no user (F2)
        (f"redis://:{SECRET}@host:6379/0", "redis://:***@host:6379/0"),
        (f"postgresql://:{SECRET}@host/db", "postgresql://:***@host/db"),
        # a password that holds : / and @, which SQLAlchemy takes as they are
        (
            "postgresql+psycopg2://me:pa:ss/word@localhost/db",
            "postgresql+psycopg2://me:***@localhost/db",
        ),
        (f"postgresql://u:a@{SECRET}@host/db", "postgresql://u:***@host/db"),
        # a tracking URI with a token (F1)
        (f"http://user:{SECRET}@mlflow:5000", "http://user:***@mlflow:5000"),
        (f"https://user:{SECRET}@mlflow.example.com/", "https://user:***@mlflow.example.com/"),
        # query-string passwords and tokens (F2), the other parameters kept
        (
            f"postgresql://u@host/db?password={SECRET}&sslmode=require",
            "postgresql://u@host/db?password=***&sslmode=require",
        ),
        (f"redis://host:6379/0?password={SECRET}", "redis://host:6379/0?password=***"),
        (f"http://mlflow:5000/?token={SECRET}", "http://mlflow:5000/?token=***"),
        (f"http://h/x?a=1&access_token={SECRET}#top", "http://h/x?a=1&access_token=***#top"),
        (f"postgresql://h/db?sslpassword={SECRET}", "postgresql://h/db?sslpassword=***"),
        (
            f"https://b.s3/k?X-Amz-Signature={SECRET}&X-Amz-Date=1",
            "https://b.s3/k?X-Amz-Signature=***&X-Amz-Date=1",
        ),
        (f"https://h/x?apiKey={SECRET}", "https://h/x?apiKey=***"),
        # libpq's keyword form, quoted or not
        (f"host=db user=u password={SECRET} port=5432", "host=db user=u password=*** port=5432"),
        ("host=db password='with space' port=5432", "host=db password=*** port=5432"),
        # in a sentence, as an error quotes it
        (
            f"study.storage: cannot open 'postgresql://u:{SECRET}@h/db': OperationalError: x",
            "study.storage: cannot open 'postgresql://u:***@h/db': OperationalError: x",
        ),
        (
            f"MLflow at http://u:{SECRET}@h:5000 did not answer (x@y)",
            "MLflow at http://u:***@h:5000 did not answer (x@y)",
        ),
    ],
)
def test_redact_hides_every_form_of_secret(text: str, shown: str) -> None:
    # the secret goes, everything else stays as it was
    assert redact(text) == shown


@pytest.mark.parametrize(
    "text",
    [
        # no password: a user alone, no user, a path, a journal
        "postgresql://optuna@db/studies",
        "postgresql://db:5432/studies",
        "sqlite:///runs/quickstart/autotune.db",
        "sqlite:///runs/user:name/autotune.db",
        "journal:////shared/study.journal",
        "http://127.0.0.1:5000",
        # parameters whose names say nothing secret, even where a secret word is inside them
        "http://h/x?sslmode=require&monkey=1&author=me&key_dim=3",
        "train.lr: Input should be greater than 0 (got -1.0)",
        "block0.rate=0.25 bn_momentum=0.1",
    ],
)
def test_redact_leaves_what_is_not_secret(text: str) -> None:
    assert redact(text) == text


def test_redact_params_masks_secret_names_and_urls() -> None:
    params = {
        "study.storage": f"postgresql://postgres:{SECRET}@127.0.0.1:5432/db",
        "mlflow.tracking_uri": f"http://user:{SECRET}@127.0.0.1:5000",
        "data.kwargs.password": SECRET,
        "data.kwargs.api_token": SECRET,
        "model.kwargs.key_dim": 64,
        "train.lr": 0.001,
    }
    shown = redact_params(params)
    # no value holds the secret any more
    assert not any(SECRET in value for value in shown.values())
    # a value whose name says secret is masked whole; a URL keeps its host
    assert shown["data.kwargs.password"] == shown["data.kwargs.api_token"] == MASK
    assert shown["study.storage"] == "postgresql://postgres:***@127.0.0.1:5432/db"
    # the rest as MLflow keeps them: strings, unchanged
    assert shown["model.kwargs.key_dim"] == "64" and shown["train.lr"] == "0.001"


def test_no_spec_field_is_taken_for_a_secret() -> None:
    # every param a spec logs keeps its value: none of its names says secret
    params = flatten(Spec().model_dump(mode="json", by_alias=True))
    assert [name for name in params if is_secret_name(name)] == []


@pytest.mark.parametrize(
    "name", ["password", "passwd", "pwd", "sslpassword", "client_secret", "token", "private_key"]
)
def test_secret_names(name: str) -> None:
    # what a secret's name looks like, however it is spelled
    assert SECRET_NAME.search(name) and SECRET_NAME.search(name.upper())


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # a token as the user of an http(s) URL, as git and pip take one
        (f"https://{SECRET}@mlflow.example.com/", "https://***@mlflow.example.com/"),
        # a secret in a dict's repr, as an error quotes keyword arguments
        (
            f"data.kwargs: {{'password': '{SECRET}', 'n': 3}}",
            "data.kwargs: {'password': '***', 'n': 3}",
        ),
        (f'{{"api_token": "{SECRET}"}}', "{\"api_token\": '***'}"),
        # two URLs in one text, apart or in one word
        (
            f"from postgresql://u:{SECRET}@h/db to redis://:{SECRET}@r:6379/0",
            "from postgresql://u:***@h/db to redis://:***@r:6379/0",
        ),
        (f"a=http://u:{SECRET}@h,b=http://v:{SECRET}@g", "a=http://u:***@h,b=http://v:***@g"),
    ],
)
def test_redact_hides_tokens_as_users_and_secret_items(text: str, shown: str) -> None:
    assert redact(text) == shown


@pytest.mark.parametrize(
    "text",
    [
        "a://b:" * 50_000,  # a URL's start, again and again, with no @ to end a password
        "x.y." * 100_000 + "://",
        "'password': '" * 30_000,
        "p=" * 100_000,
    ],
)
def test_redact_takes_linear_time(text: str) -> None:
    # a 300 KB value in an error message is redacted at once (a quadratic regex took minutes)
    import time

    started = time.perf_counter()
    redact(text)
    assert time.perf_counter() - started < 1.0

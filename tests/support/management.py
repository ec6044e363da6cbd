"""RabbitMQ's management API, as the tests read it."""

from __future__ import annotations

from urllib.parse import quote

import requests

API = "http://127.0.0.1:15672/api"


def vhost_of(rabbit_uri: str) -> str:
    return rabbit_uri.rsplit("/", 1)[1]


def _url(path: tuple[str, ...]) -> str:
    return "/".join([API, *(quote(part, safe="") for part in path)])


def get(*path: str):
    """``get("queues", vhost, name)``: the JSON of ``/api/queues/<vhost>/<name>``."""
    answer = requests.get(_url(path), auth=("guest", "guest"), timeout=10)
    answer.raise_for_status()
    return answer.json()


def delete(*path: str) -> None:
    """``delete("connections", name)``; what is already gone is no error."""
    answer = requests.delete(_url(path), auth=("guest", "guest"), timeout=10)
    if answer.status_code != 404:
        answer.raise_for_status()

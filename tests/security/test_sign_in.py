"""The dashboard's sign-in: no open redirect, and a cookie scripts cannot read.

``/login?next=…`` sends a user back where they were after signing in. A link
to the real portal whose ``next`` points elsewhere would turn its trusted
sign-in page into a springboard to a look-alike one: only a path on this
site is followed, anything else lands on the dashboard's home. The session
cookie carries the bearer token: ``HttpOnly`` (no script reads it),
``SameSite=Lax`` (no other site's form posts with it) and, when the portal
is served over HTTPS, ``Secure`` (never sent in clear).
"""

from __future__ import annotations

import pytest

from gateway.app import DEFAULT_CONFIG, SESSION_COOKIE_SECURE
from services.common import config as cfg

OFF_SITE = [
    "/\\evil.example",  # browsers read "\" as "/": //evil.example
    "//evil.example",
    "https://evil.example",
    "/%5Cevil.example",  # the same, percent-encoded once more
    "/%2F/evil.example",
    "javascript:alert(document.cookie)",
    "/\t/evil.example",  # browsers drop tabs and newlines: //evil.example
    "/%0A/evil.example",
    "evil.example",
    "",
]


@pytest.mark.parametrize("target", OFF_SITE, ids=repr)
def test_sign_in_never_redirects_off_site(sign_in, target):
    response = sign_in(next=target)

    assert response.status_code == 302
    assert response.headers["Location"] == "/"


@pytest.mark.parametrize(
    "target", ["/cities/shanghai", "/vouchers/SH-1?tab=redemptions", "/"]
)
def test_sign_in_returns_to_the_page_on_this_site(sign_in, target):
    response = sign_in(next=target)

    assert response.status_code == 302
    assert response.headers["Location"] == target


def test_the_page_asking_for_sign_in_is_returned_to(client, sign_in):
    """The whole round: a voucher page sends the user to sign in and back."""
    asked = client.get("/vouchers/SH-1")
    assert asked.status_code == 302
    assert asked.headers["Location"] == "/login?next=/vouchers/SH-1"
    assert 'value="/vouchers/SH-1"' in client.get(asked.headers["Location"]).text

    assert sign_in(next="/vouchers/SH-1").headers["Location"] == "/vouchers/SH-1"


def _session_cookie(response) -> list[str]:
    (cookie,) = response.headers.getlist("Set-Cookie")
    assert cookie.startswith("session=")
    return [flag.strip().lower() for flag in cookie.split(";")]


def test_session_cookie_is_hidden_from_scripts_and_other_sites(sign_in):
    flags = _session_cookie(sign_in())

    assert "httponly" in flags
    assert "samesite=lax" in flags


def test_session_cookie_works_over_plain_http_by_default(sign_in, client):
    """``make run`` serves http://localhost: a Secure cookie would never come
    back, so Secure is off unless the portal says it is served over HTTPS."""
    flags = _session_cookie(sign_in())

    assert "secure" not in flags
    assert client.get("/login").status_code == 200


def test_session_cookie_is_secure_when_served_over_https(make_app, token_for):
    config = cfg.load_config(DEFAULT_CONFIG, env={"PORTAL_HTTPS": "true"})
    assert config[SESSION_COOKIE_SECURE] is True
    client = make_app(**config).test_client()
    token = token_for("national_admin")["Authorization"].split()[1]

    flags = _session_cookie(client.post("/login", data={"token": token}))

    assert {"secure", "httponly", "samesite=lax"} <= set(flags)


@pytest.mark.parametrize("value", ["ture", "1", "https"])
def test_a_mistyped_https_setting_is_refused(make_app, value):
    """A typo must not pass for "yes" (or for "no") without a word."""
    config = cfg.load_config(DEFAULT_CONFIG, env={"PORTAL_HTTPS": value})

    with pytest.raises(cfg.ConfigError, match=SESSION_COOKIE_SECURE):
        make_app(**config)


def test_the_cookie_keeps_its_flags_when_the_session_is_cleared(sign_in, client):
    sign_in()

    (cookie,) = client.post("/logout").headers.getlist("Set-Cookie")
    flags = [flag.strip().lower() for flag in cookie.split(";")]

    assert cookie.startswith("session=;")
    assert "httponly" in flags
    assert "samesite=lax" in flags

"""Auth (API keys, JWT), per-key rate limit and the prompt blocklist, in-process on a fake pipeline."""

from __future__ import annotations

import os
import time

import httpx
import jwt
import pytest
from openai import AsyncOpenAI, AuthenticationError

from sdserve import watched
from sdserve.app import create_app
from sdserve.settings import Settings
from sdtesting.asgi import BASE_URL, metric, serve
from sdtesting.fakes import FakePipeline

BODY = {"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 1}
SECRET = "test-shared-secret-with-enough-bytes-for-hs256"


def app(**settings):
    return create_app(Settings(model="fake", min_side=64, **settings), FakePipeline())


@pytest.fixture
async def secured(tmp_path):
    d = tmp_path
    (d / "keys").write_text("# team keys\nalice:key-alice\nbob:key-bob\nkey-anon\n")
    (d / "jwt").write_text(SECRET)
    (d / "blocklist").write_text("forbidden\nre:bad\\s+thing\n")
    secured_app = app(
        api_keys_file=str(d / "keys"),
        jwt_issuer="https://issuer.test/",
        jwt_audience="sd-api",
        jwt_key_file=str(d / "jwt"),
        jwt_algorithms="HS256",
        rate_limit_enabled=True,
        rate_limit_rps=0.2,
        rate_limit_burst=3,
        blocklist_file=str(d / "blocklist"),
    )
    async with serve(secured_app) as client:
        yield client


async def post(client, headers=None, **body):
    return await client.post("/generate", json={**BODY, **body}, headers=headers or {})


def token(aud="sd-api", iss="https://issuer.test/", exp=300, sub="carol"):
    return jwt.encode({"sub": sub, "aud": aud, "iss": iss, "exp": int(time.time()) + exp}, SECRET, algorithm="HS256")


async def test_missing_credentials_is_401_with_clear_body(secured):
    r = await post(secured)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "missing_credentials"
    assert r.headers["www-authenticate"] == 'Bearer realm="sdserve"'  # RFC 6750: no error when none was sent


async def test_wrong_api_key_is_401(secured):
    r = await post(secured, {"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == 'Bearer realm="sdserve", error="invalid_token"'
    r = await post(secured, {"Authorization": "Basic abc"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_authorization_header"
    assert r.headers["www-authenticate"].startswith("Bearer ")


async def test_api_key_by_bearer_or_header_is_accepted(secured):
    assert (await post(secured, {"Authorization": "Bearer key-anon"})).status_code == 200
    assert (await post(secured, {"X-API-Key": "key-anon"})).status_code == 200


async def test_jwt_valid_wrong_audience_and_expired(secured):
    assert (await post(secured, {"Authorization": f"Bearer {token(sub='jwt-ok')}"})).status_code == 200
    r = await post(secured, {"Authorization": f"Bearer {token(aud='other-api', sub='jwt-aud')}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "token_not_for_this_service"
    r = await post(secured, {"Authorization": f"Bearer {token(exp=-60, sub='jwt-exp')}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_expired"
    bad = jwt.encode(
        {"sub": "x", "aud": "sd-api", "iss": "https://issuer.test/", "exp": int(time.time()) + 60},
        "another-secret-of-enough-length-xx",
        algorithm="HS256",
    )
    assert (await post(secured, {"Authorization": f"Bearer {bad}"})).json()["error"]["code"] == "invalid_token"


async def test_openai_sdk_sends_its_api_key_as_bearer(secured):
    ok = AsyncOpenAI(base_url=BASE_URL + "/v1", api_key="key-bob", http_client=secured)
    assert (await ok.models.list()).data[0].id == "fake"
    with pytest.raises(AuthenticationError):
        wrong = AsyncOpenAI(base_url=BASE_URL + "/v1", api_key="wrong", max_retries=0, http_client=secured)
        await wrong.models.list()


async def test_rate_limit_per_key_is_429_with_retry_after(secured):
    alice = {"Authorization": "Bearer key-alice"}
    statuses = [(await post(secured, alice)).status_code for _ in range(4)]
    assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
    r = await post(secured, alice)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "rate_limited"
    # Another key has its own bucket.
    assert (await post(secured, {"Authorization": f"Bearer {token(sub='dave')}"})).status_code == 200
    assert metric("sdserve_rate_limited_total") >= 2


async def test_blocklist_words_and_patterns_are_400_with_reason(secured):
    h = {"Authorization": f"Bearer {token(sub='erin')}"}
    before = metric("sdserve_prompts_rejected_total", reason="blocked_word")
    r = await post(secured, h, prompt="a FORBIDDEN castle")
    assert r.status_code == 400 and r.json()["error"]["code"] == "blocked_word"
    assert metric("sdserve_prompts_rejected_total", reason="blocked_word") == before + 1
    h = {"Authorization": f"Bearer {token(sub='frank')}"}
    r = await post(secured, h, prompt="ok", negative_prompt="a bad   thing")
    assert r.status_code == 400 and r.json()["error"]["code"] == "blocked_pattern"
    # Substrings of other words are not blocked.
    h = {"Authorization": f"Bearer {token(sub='gina')}"}
    assert (await post(secured, h, prompt="unforbiddenness")).status_code == 200


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ("a ＦＯＲＢＩＤＤＥＮ castle", "blocked_word"),  # fullwidth letters
        ("a for\u200bbidden castle", "blocked_word"),  # a zero-width space inside the word
        ("a forbid\u00addent castle", None),  # a soft hyphen, but another word
        ("a forbid\u00adden castle", "blocked_word"),
        ("a bad\u2003\u2060thing", "blocked_pattern"),  # an em space and a word joiner
        ("unforbiddenness", None),
        ("a f\u043erbidden castle", "blocked_word"),  # a Cyrillic o
        ("a FORB\u0406DDEN castle", "blocked_word"),  # a Cyrillic capital I (reads as l; its lower case as i)
        ("a f\u03bfrbidd\u0435\u0578 castle", "blocked_word"),  # Greek o, Cyrillic e, Armenian n
        ("a b\u0430d thing", "blocked_pattern"),  # a Cyrillic a, in a pattern's match
        ("a f\u043erbiddenness", None),  # still whole words only
        (
            "\u0441\u0435\u043a\u0441 \u0441\u043e\u0431\u0430\u043a\u0430",
            None,
        ),  # Russian words that read as no listed word
        ("\u0441\u0435\u043a\u0441\u0442", "blocked_word"),  # a listed Cyrillic word in Cyrillic
        ("\u0441e\u043a\u0441\u0442", "blocked_word"),  # and with a Latin e in it
    ],
)
def test_the_blocklist_matches_the_plain_form_of_a_prompt(prompt, reason):
    """Spellings a reader (and the text encoder) reads as the listed word do not slip past it:
    Unicode compatibility forms are folded, invisible format characters dropped, and letters
    of other scripts that look like Latin ones read as those, in the prompt and the list."""
    from sdserve.safety import Blocklist

    listed = "forbidden\n\u0441\u0435\u043a\u0441\u0442\nre:bad\\s+thing\n"
    assert Blocklist.from_text(listed).check(prompt) == reason


async def test_jwt_rs256_via_jwks_endpoint():
    """RS256 tokens checked against keys fetched from a JWKS URL (served on loopback)."""
    import http.server
    import json
    import threading

    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    from sdtesting.procs import free_port

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", use="sig", alg="RS256")
    body = json.dumps({"keys": [jwk]}).encode()

    class Jwks(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Jwks)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        jwks_app = app(
            jwt_issuer="https://idp.test/",
            jwt_audience="sd",
            jwt_jwks_url=f"http://127.0.0.1:{port}/jwks.json",
            jwt_algorithms="RS256",
        )
        async with serve(jwks_app) as s:
            await _check_rs256(s, key)
    finally:
        httpd.shutdown()


async def _check_rs256(s, key):
    """A token signed by the JWKS key passes; one with the same kid signed by another key is refused."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    claims = {"sub": "svc", "aud": "sd", "iss": "https://idp.test/", "exp": int(time.time()) + 60}
    good = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})
    assert (await post(s, {"Authorization": f"Bearer {good}"})).status_code == 200
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, other, algorithm="RS256", headers={"kid": "k1"})
    r = await post(s, {"Authorization": f"Bearer {forged}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"


MULTIPART = "multipart/form-data; boundary=x"


def chunks(total: int, counter: list[int], head: bytes, size: int = 64 * 1024):
    """A request body of ``total`` bytes after ``head``, sent without a Content-Length;
    ``counter`` counts the bytes the server asked for."""

    async def body():
        yield head
        for _ in range(total // size):
            counter[0] += size
            yield b"x" * size

    return body()


@pytest.mark.parametrize("route", ["/v1/images/edits", "/v1/images/generations", "/generate"])
async def test_a_body_over_the_limit_is_refused_413_before_it_is_read(route):
    """The limit is two uploads (image and mask) and 1 MiB of form fields: a larger body is a
    413 as soon as its Content-Length says so, or as soon as that many bytes of a chunked body
    arrived, not after the server read it all into memory."""
    limited = app(max_upload_bytes=64 * 1024)  # the limit: 1 MiB + 128 KiB
    async with serve(limited) as client:
        before = metric("sdserve_http_requests_total", route=route, method="POST", status="413")
        declared = {"content-type": MULTIPART, "content-length": str(8 * 2**20)}
        r = await client.post(route, content=b"", headers=declared)
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "request_too_large" and "1179648 bytes" in error["message"]
        sent = [0]
        if route.endswith("edits"):  # an image upload that goes on and on
            head = b'--x\r\ncontent-disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
            kind = MULTIPART
        else:
            head, kind = b'{"prompt": "', "application/json"
        r = await client.post(route, content=chunks(8 * 2**20, sent, head), headers={"content-type": kind})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert sent[0] < 2 * 2**20  # it stopped reading past the limit
        assert metric("sdserve_http_requests_total", route=route, method="POST", status="413") == before + 2
        r = await client.post("/generate", json=BODY)  # the server goes on
        assert r.status_code == 200, r.text


async def test_an_api_keys_file_without_a_key_refuses_every_request(tmp_path):
    """A Secret mounted with no key in it (empty, or comments only) must not open the API."""
    (tmp_path / "keys").write_text("# every key revoked\n")
    async with serve(app(api_keys_file=str(tmp_path / "keys"))) as client:
        r = await post(client)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_credentials"
        r = await post(client, {"Authorization": "Bearer anything"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def swap(path, text: str) -> None:
    """Replace a file the way the kubelet updates a mounted Secret or ConfigMap: a new file
    moved into place (a new inode), never an edit in place."""
    staged = path.with_suffix(".new")
    staged.write_text(text)
    os.replace(staged, path)


async def test_rotated_api_keys_and_an_edited_blocklist_apply_without_a_restart(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(watched, "RECHECK_SECONDS", 0.0)
    keys, blocklist = tmp_path / "keys", tmp_path / "blocklist"
    keys.write_text("alice:key-old\n")
    blocklist.write_text("dragon\n")
    async with serve(app(api_keys_file=str(keys), blocklist_file=str(blocklist))) as client:
        old, new = {"Authorization": "Bearer key-old"}, {"Authorization": "Bearer key-new"}
        assert (await post(client, old)).status_code == 200
        assert (await post(client, new)).status_code == 401
        assert (await post(client, old, prompt="a dragon")).status_code == 400
        swap(keys, "alice:key-new\n")  # the leaked key revoked, a new one issued
        swap(blocklist, "unicorn\n")
        assert (await post(client, old)).status_code == 401
        assert (await post(client, new)).status_code == 200
        assert (await post(client, new, prompt="a dragon")).status_code == 200
        assert (await post(client, new, prompt="a unicorn")).status_code == 400
        swap(blocklist, "re:(unclosed\n")  # a list that does not parse: the last good one stays
        assert (await post(client, new, prompt="a unicorn")).status_code == 400
        assert "keeping the last good one" in caplog.text


async def test_a_rotated_jwt_key_applies_without_a_restart(tmp_path, monkeypatch):
    monkeypatch.setattr(watched, "RECHECK_SECONDS", 0.0)
    key = tmp_path / "jwt"
    key.write_text(SECRET)
    settings = {"jwt_issuer": "https://issuer.test/", "jwt_audience": "sd-api", "jwt_algorithms": "HS256"}
    async with serve(app(jwt_key_file=str(key), **settings)) as client:
        bearer = {"Authorization": f"Bearer {token()}"}
        assert (await post(client, bearer)).status_code == 200
        swap(key, "the-next-shared-secret-with-enough-bytes-too")
        r = await post(client, bearer)  # signed with the old key
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"


async def test_the_drain_endpoint_answers_the_pods_own_prestop_hook_only():
    """POST /admin/drain stops a replica taking work: only a caller on the pod's loopback may,
    and not a request that came through a proxy (it carries X-Forwarded-For: with a trusted
    proxy the client address is the header's, which a client may have written)."""
    served = app()
    async with serve(served) as local:
        remote = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=served, client=("10.1.2.3", 5000)), base_url=BASE_URL
        )
        async with remote:
            assert (await remote.post("/admin/drain")).status_code == 403
        for header in ({"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"}):
            r = await local.post("/admin/drain", headers=header)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
        assert (await post(local)).status_code == 200  # still serving
        r = await local.post("/admin/drain")
        assert r.status_code == 200 and r.json() == {"drained": True, "queued": 0}
        r = await post(local)
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"

"""Bad input to the daemon's API: every case gets a 4xx whose message says what to change, never
a 5xx, and the daemon and its VM still work afterwards.

Against the real daemon (a `warden serve` subprocess) with one real VM, so a value that passed
the API's checks and then broke the guest agent would show here as a 5xx.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import ServeProcess, serving
from warden import records
from warden.server.limits import (
    MAX_ARG,
    MAX_ARGV,
    MAX_ENV,
    MAX_EXEC_TIMEOUT_S,
    MAX_JSON_BODY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_PATH,
)
from warden.vmm.spec import MIN_MEMORY_MIB

pytestmark = pytest.mark.vm

MEMORY = 256
FUZZ_EXAMPLES = 60


@dataclass
class Daemon:
    serve: ServeProcess
    vm: str
    http: httpx.Client = field(repr=False)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with serving(tmp_path_factory.mktemp("bad-input")) as serve, serve.client() as http:
        r = http.post("/v1/sandboxes", json={"memory_mib": MEMORY, "name": "bad-input"})
        assert r.status_code == 201, r.text
        yield Daemon(serve, r.json()["id"], http)


@dataclass(frozen=True)
class Case:
    """One bad request, the status it must get and a piece of the message that says what to
    change (``{vm}`` in the URL is the test VM's id)."""

    id: str
    method: str
    url: str
    status: int
    says: str
    json: Any = None
    params: dict[str, Any] | None = None
    content: bytes | None = None


SB = "/v1/sandboxes"
VM = "/v1/sandboxes/{vm}"
TOO_MANY_LABELS = {f"k{i}": "v" for i in range(MAX_LABELS + 1)}
TOO_MANY_ENV = {f"K{i}": "v" for i in range(MAX_ENV + 1)}

CASES = [
    # create
    Case("name-too-long", "POST", SB, 422, "at most 63", json={"name": "a" * 64}),
    Case("name-chars", "POST", SB, 422, "a-z, 0-9", json={"name": "Bad Name"}),
    Case("image-chars", "POST", SB, 422, "image name", json={"image": "../etc"}),
    Case("memory-negative", "POST", SB, 422, str(MIN_MEMORY_MIB), json={"memory_mib": -1}),
    Case("memory-huge", "POST", SB, 422, "1048576", json={"memory_mib": 10**12}),
    Case("vcpus-zero", "POST", SB, 422, "greater than or equal to 1", json={"vcpus": 0}),
    Case("vcpus-huge", "POST", SB, 422, "64", json={"vcpus": 10**6}),
    Case("unknown-field", "POST", SB, 422, "Extra inputs", json={"bogus": 1}),
    Case("not-json", "POST", SB, 422, "JSON", content=b"{not json"),
    Case(
        "label-value-long",
        "POST",
        SB,
        422,
        str(MAX_LABEL_VALUE),
        json={"labels": {"k": "v" * (MAX_LABEL_VALUE + 1)}},
    ),
    Case("too-many-labels", "POST", SB, 422, str(MAX_LABELS), json={"labels": TOO_MANY_LABELS}),
    Case("env-name", "POST", SB, 422, "environment variable name", json={"env": {"1X": "v"}}),
    Case("env-nul", "POST", SB, 422, "NUL", json={"env": {"X": "a\0b"}}),
    Case("too-many-env", "POST", SB, 422, str(MAX_ENV), json={"env": TOO_MANY_ENV}),
    Case(
        "label-150mb-style",
        "POST",
        SB,
        413,
        str(MAX_JSON_BODY),
        json={"labels": {"k": "v" * (MAX_JSON_BODY + 1)}},
    ),
    # exec
    Case("cmd-empty-list", "POST", f"{VM}/exec", 422, "at least 1", json={"cmd": []}),
    Case("cmd-empty-line", "POST", f"{VM}/exec", 422, "at least 1", json={"cmd": ""}),
    Case("cmd-nul", "POST", f"{VM}/exec", 422, "NUL", json={"cmd": ["echo", "a\0b"]}),
    Case("cmd-not-list", "POST", f"{VM}/exec", 422, "valid list", json={"cmd": 5}),
    Case(
        "argv-too-many",
        "POST",
        f"{VM}/exec",
        422,
        str(MAX_ARGV),
        json={"cmd": ["true"] * (MAX_ARGV + 1)},
    ),
    Case(
        "arg-too-long",
        "POST",
        f"{VM}/exec",
        422,
        str(MAX_ARG),
        json={"cmd": ["echo", "a" * (MAX_ARG + 1)]},
    ),
    Case("cwd-relative", "POST", f"{VM}/exec", 422, "absolute", json={"cmd": ["true"], "cwd": "t"}),
    Case("cwd-nul", "POST", f"{VM}/exec", 422, "NUL", json={"cmd": ["true"], "cwd": "/t\0"}),
    Case(
        "timeout-1e308",
        "POST",
        f"{VM}/exec",
        422,
        f"{MAX_EXEC_TIMEOUT_S:g}",
        json={"cmd": ["true"], "timeout": 1e308},
    ),
    Case(
        "timeout-inf",
        "POST",
        f"{VM}/exec",
        422,
        "finite",
        content=b'{"cmd": ["true"], "timeout": Infinity}',
    ),
    Case(
        "timeout-nan",
        "POST",
        f"{VM}/exec",
        422,
        "finite",
        content=b'{"cmd":["true"],"timeout":NaN}',
    ),
    Case(
        "timeout-neg",
        "POST",
        f"{VM}/exec",
        422,
        "greater than 0",
        json={"cmd": ["true"], "timeout": -1},
    ),
    Case(
        "exec-env",
        "POST",
        f"{VM}/exec",
        422,
        "variable name",
        json={"cmd": ["true"], "env": {"A=B": ""}},
    ),
    Case("stdin-base64", "POST", f"{VM}/exec", 422, "base64", json={"cmd": ["cat"], "stdin": "!!"}),
    Case(
        "stdin-both",
        "POST",
        f"{VM}/exec",
        422,
        "not both",
        json={"cmd": ["cat"], "stdin": "", "stdin_stream": True},
    ),
    Case(
        "user-unknown",
        "POST",
        f"{VM}/exec",
        422,
        "'user' or 'root'",
        json={"cmd": ["true"], "user": "x"},
    ),
    # Root in the guest is the access policy's exec-as-root: test_access_matrix.py.
    Case("exec-no-vm", "POST", f"{SB}/nope/exec", 404, "nope", json={"cmd": ["true"]}),
    Case("stdin-no-exec", "PUT", f"{VM}/execs/nope/stdin", 404, "exec_id", content=b"x"),
    # files
    Case("put-relative", "PUT", f"{VM}/files", 422, "absolute", params={"path": "x"}, content=b""),
    Case("put-nul", "PUT", f"{VM}/files", 422, "NUL", params={"path": "/tmp/a\0"}, content=b""),
    Case(
        "put-mode-neg",
        "PUT",
        f"{VM}/files",
        422,
        "greater than or equal to 0",
        params={"path": "/tmp/a", "mode": -1},
        content=b"",
    ),
    Case(
        "put-mode-big",
        "PUT",
        f"{VM}/files",
        422,
        "4095",
        params={"path": "/tmp/a", "mode": 0o10000},
        content=b"",
    ),
    Case("put-no-path", "PUT", f"{VM}/files", 422, "path", content=b""),
    Case("get-relative", "GET", f"{VM}/files", 422, "absolute", params={"path": "etc/passwd"}),
    Case(
        "get-long", "GET", f"{VM}/files", 422, str(MAX_PATH), params={"path": "/" + "a" * MAX_PATH}
    ),
    Case("get-missing", "GET", f"{VM}/files", 404, "No such file", params={"path": "/nonexistent"}),
    Case("stat-relative", "GET", f"{VM}/files/stat", 422, "absolute", params={"path": "."}),
    Case(
        "stat-user-unknown",
        "GET",
        f"{VM}/files/stat",
        422,
        "'user' or 'root'",
        params={"path": "/", "user": "bob"},
    ),
    Case("list-nul", "GET", f"{VM}/files/list", 422, "NUL", params={"path": "/\0"}),
    Case(
        "list-not-dir",
        "GET",
        f"{VM}/files/list",
        400,
        "Not a directory",
        params={"path": "/etc/hostname"},
    ),
    Case("delete-relative", "DELETE", f"{VM}/files", 422, "absolute", params={"path": "tmp"}),
    Case(
        "mkdir-mode",
        "POST",
        f"{VM}/files/mkdir",
        422,
        "4095",
        params={"path": "/tmp/d", "mode": 0o10000},
    ),
    Case("mkdir-relative", "POST", f"{VM}/files/mkdir", 422, "absolute", params={"path": "d"}),
    # sandboxes, events, logs
    Case("inspect-missing", "GET", f"{SB}/nope", 404, "nope"),
    Case("stop-missing", "POST", f"{SB}/nope/stop", 404, "nope"),
    Case("rm-missing", "DELETE", f"{SB}/nope", 404, "nope"),
    Case("logs-lines", "GET", f"{VM}/logs", 422, "10000", params={"lines": 10**9}),
    Case(
        "events-after-neg",
        "GET",
        "/v1/events",
        422,
        "greater than or equal to 0",
        params={"after": -1},
    ),
    Case("events-after-huge", "GET", "/v1/events", 422, str(2**63 - 1), params={"after": 2**64}),
    Case("events-limit", "GET", "/v1/events", 422, "10000", params={"limit": 10**5}),
    Case("events-vm-empty", "GET", "/v1/events", 422, "at least 1", params={"vm": ""}),
]


def _send(d: Daemon, case: Case) -> httpx.Response:
    headers = {"content-type": "application/json"} if case.content is not None else None
    return d.http.request(
        case.method,
        case.url.format(vm=d.vm),
        json=case.json,
        params=case.params,
        content=case.content,
        headers=headers,
    )


def _detail(response: httpx.Response) -> str:
    return json.dumps(response.json()["error"])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_a_4xx_that_says_what_to_change(daemon: Daemon, case: Case) -> None:
    response = _send(daemon, case)
    assert response.status_code == case.status, response.text[:500]
    assert case.says in _detail(response), response.text[:500]


def test_memory_too_small_to_boot_is_refused_naming_the_minimum(daemon: Daemon) -> None:
    response = daemon.http.post("/v1/sandboxes", json={"memory_mib": 64})
    if response.status_code == 201:  # booted (or tried to): not this test's to keep
        daemon.http.delete(f"{SB}/{response.json()['id']}", params={"force": "true"})
    assert response.status_code == 422, response.text[:500]
    assert str(MIN_MEMORY_MIB) in _detail(response)


def _chunked_post(sock_path: Path, url: str, chunk: bytes, total: int) -> tuple[int, bytes]:
    """POST a chunked body of up to ``total`` bytes without a Content-Length; stop sending
    once the daemon answered (or closed). Returns the status and the response body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(sock_path))
        s.sendall(
            f"POST {url} HTTP/1.1\r\nhost: warden\r\ncontent-type: application/json\r\n"
            "transfer-encoding: chunked\r\n\r\n".encode()
        )
        sent = 0
        try:
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            while sent < total:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered and closed: the rest is never read
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < 4096:
            try:
                piece = s.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_a_chunked_body_cannot_pass_the_limit(daemon: Daemon) -> None:
    """No Content-Length: the daemon counts the bytes it reads and stops at the limit."""
    before = daemon.http.get("/v1/sandboxes", params={"all": "true"}).json()
    status, body = _chunked_post(
        daemon.serve.socket, "/v1/sandboxes", b'{"labels": {"k": "' + b"v" * 65536, 8 << 20
    )
    assert status == 413
    assert str(MAX_JSON_BODY).encode() in body
    # the daemon still answers, and stored nothing
    after = daemon.http.get("/v1/sandboxes", params={"all": "true"}).json()
    assert [vm["id"] for vm in after] == [vm["id"] for vm in before]


def test_streamed_bodies_are_not_limited_like_json(daemon: Daemon) -> None:
    """A file upload is a stream, not JSON: it may be larger than the JSON limit."""
    size = MAX_JSON_BODY * 2 + 1
    url = f"{VM.format(vm=daemon.vm)}/files"
    r = daemon.http.put(url, params={"path": "/tmp/big"}, content=b"x" * size)
    assert r.status_code == 200, r.text
    assert r.json()["size"] == size
    r = daemon.http.get(f"{url}/stat", params={"path": "/tmp/big"})
    assert r.json()["size"] == size


def _exec_ok(d: Daemon) -> None:
    r = d.http.post(f"{VM.format(vm=d.vm)}/exec", json={"cmd": ["echo", "still here"]})
    assert r.status_code == 200, r.text
    got = records.RecordDecoder().feed(r.content)
    assert (records.Kind.STDOUT, b"still here\n") in got
    assert got[-1] == (records.Kind.CONTROL, {"exit_code": 0, "signal": None, "timed_out": False})


_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
_PATHS = st.one_of(
    _TEXT,
    _TEXT.map(lambda t: "/tmp/fuzz/" + t),
    st.sampled_from(["/", "/tmp", "/etc/hostname", "/nonexistent", "rel", "/a\0b", "/" * 5000]),
)
_SAFE_PATHS = st.one_of(
    st.sampled_from(["/tmp/fuzz", "/tmp/fuzz/a", "/tmp/fuzz/a/b", "/home/user/f", "/root/f"]),
    _TEXT.map(lambda t: "/tmp/fuzz/" + t.replace("..", "__")),
)
_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 0o7777, 0o10000, 2**63]),
)
_USERS = st.one_of(st.just("user"), st.sampled_from(["root", "", "nobody"]), _TEXT)
_GOOD_DIRS = st.sampled_from(["/", "/tmp", "/home/user", "/root", "/nonexistent", "/etc/hostname"])
_ENV_KEYS = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,20}\Z")
_TIMEOUTS = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.just(0.5))


def _json_body(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()  # NaN and Infinity as Python writes them


_EXEC_BODIES = st.fixed_dictionaries(
    {
        "cmd": st.one_of(
            st.lists(_TEXT, max_size=3).map(lambda args: ["echo", *args]),
            st.lists(_TEXT, min_size=1, max_size=2).map(lambda a: ["/nonexistent/" + a[0], *a]),
            _TEXT.map(lambda t: "echo " + json.dumps(t)),
            st.just([]),
            st.integers(),
        ),
    },
    optional={
        "cwd": st.one_of(_GOOD_DIRS, _PATHS),
        "timeout": _TIMEOUTS,
        "env": st.dictionaries(st.one_of(_ENV_KEYS, _TEXT), _TEXT, max_size=3),
        "user": _USERS,
        "stdin": st.one_of(st.just("aGk="), _TEXT),
    },
)


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(body=_EXEC_BODIES)
def test_fuzzed_exec_never_gets_a_5xx(daemon: Daemon, body: dict[str, Any]) -> None:
    r = daemon.http.post(
        f"{VM.format(vm=daemon.vm)}/exec",
        content=_json_body(body),
        headers={"content-type": "application/json"},
    )
    assert r.status_code < 500, f"{body!r:.300} -> {r.status_code}: {r.text[:300]}"
    if r.status_code == 200:  # the stream ends with the command's result, or an error
        decoder = records.RecordDecoder()
        got = decoder.feed(r.content)
        decoder.end()
        assert got[-1][0] is records.Kind.CONTROL, body


_READ_PATHS = st.one_of(_GOOD_DIRS, _PATHS)
_FILE_CALLS = st.one_of(
    st.tuples(st.just("GET"), st.just("/files"), _READ_PATHS),
    st.tuples(st.just("GET"), st.just("/files/stat"), _READ_PATHS),
    st.tuples(st.just("GET"), st.just("/files/list"), _READ_PATHS),
    st.tuples(st.just("PUT"), st.just("/files"), _SAFE_PATHS),
    st.tuples(st.just("POST"), st.just("/files/mkdir"), _SAFE_PATHS),
    st.tuples(st.just("DELETE"), st.just("/files"), _SAFE_PATHS),
)


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    call=_FILE_CALLS,
    mode=st.one_of(st.none(), st.integers(0, 0o7777), _NUMBERS),
    user=st.one_of(st.none(), st.just("user"), _USERS),
    flag=st.one_of(st.none(), st.sampled_from(["true", "false", "maybe", ""])),
)
def test_fuzzed_file_calls_never_get_a_5xx(
    daemon: Daemon, call: tuple[str, str, str], mode: object, user: str | None, flag: str | None
) -> None:
    method, route, path = call
    params: dict[str, Any] = {"path": path}
    if mode is not None and route in ("/files", "/files/mkdir"):
        params["mode"] = str(mode)
    if user is not None:
        params["user"] = user
    if flag is not None:
        params["recursive" if method == "DELETE" else "parents"] = flag
    content = b"fuzz" if method == "PUT" else None
    r = daemon.http.request(
        method, f"{VM.format(vm=daemon.vm)}{route}", params=params, content=content
    )
    assert r.status_code < 500, (
        f"{method} {route} {params!r:.300} -> {r.status_code}: {r.text[:300]}"
    )


def test_the_vm_and_daemon_still_work_after_all_that(daemon: Daemon) -> None:
    _exec_ok(daemon)
    r = daemon.http.get(f"{VM.format(vm=daemon.vm)}")
    assert r.json()["state"] == "running"

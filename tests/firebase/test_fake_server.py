"""The fake Realtime Database speaks what firebase-admin expects: driven here through the real SDK
(emulator mode) and raw HTTP, so a difference from the service's REST protocol fails a test rather
than hiding behind the mirror."""

import httpx
import pytest
from firebase_admin import exceptions

from tests.firebase.conftest import NAMESPACE

ADMIN = {"Authorization": "Bearer owner"}


def rest(fake, method: str, path: str, *, ns: str = NAMESPACE, headers=None, **kwargs) -> httpx.Response:
    params = {"ns": ns, **kwargs.pop("params", {})}
    return httpx.request(method, f"{fake.url}{path}", params=params, headers={**ADMIN, **(headers or {})}, timeout=10,
                         **kwargs)


def test_sdk_reads_writes_and_multi_path_updates(reader, fake_rtdb):
    assert reader("meters/nothing").get() is None
    reader("meters/M1").set({"meterNo": "M1", "balance": 10.5, "flags": {"a": True}})
    reader("/").update({"meters/M2": {"balance": 2}, "meters/M1/balance": 9.25, "meters/M1/flags": None})
    assert reader("meters").get() == {"M1": {"meterNo": "M1", "balance": 9.25}, "M2": {"balance": 2}}
    assert reader("meters").get(shallow=True) == {"M1": True, "M2": True}
    key = reader("events").push({"kind": "x"}).key
    assert len(key) == 20 and reader(f"events/{key}/kind").get() == "x"
    reader("meters/M2").delete()
    reader("events").delete()
    assert fake_rtdb.data() == {"meters": {"M1": {"meterNo": "M1", "balance": 9.25}}}
    # Namespaces are separate databases, as in the emulator.
    assert fake_rtdb.data("another-db") is None


def test_sdk_conditional_writes_and_transactions(reader):
    reference = reader("counter")
    reference.set(1)
    value, etag = reference.get(etag=True)
    assert reference.set_if_unchanged("stale-etag", 5) == (False, 1, etag)
    ok, written, new_etag = reference.set_if_unchanged(etag, 2)
    assert (ok, written) == (True, 2) and new_etag != etag
    assert reference.transaction(lambda current: current + 40) == 42
    assert reference.get() == 42


def test_database_semantics_nulls_empty_objects_arrays_and_server_values(reader):
    reader("a").set({"b": {"c": None, "d": {}}, "list": [1, None, 3], "sparse": {"0": "x", "7": "y"}})
    assert reader("a").get() == {"list": [1, None, 3], "sparse": {"0": "x", "7": "y"}}
    reader("a/list/2").delete()
    reader("a/sparse").delete()
    assert reader("a").get() == {"list": [1]}
    reader("a/list/0").delete()
    assert reader("a").get() is None  # an object left empty vanishes, up to the root
    reader("n").set({"at": {".sv": "timestamp"}, "hits": {".sv": {"increment": 2}}})
    reader("n/hits").set({".sv": {"increment": 3}})
    value = reader("n").get()
    assert value["hits"] == 5 and isinstance(value["at"], int) and value["at"] > 1_600_000_000_000
    reader("leaf").set("text")
    reader("leaf/child").set(1)  # writing below a leaf replaces the leaf
    assert reader("leaf").get() == {"child": 1}


def test_sdk_sees_the_services_errors(reader):
    with pytest.raises(exceptions.InvalidArgumentError, match="ancestor"):
        reader("/").update({"meters/M1": {"x": 1}, "meters/M1/x": 2})
    with pytest.raises(exceptions.InvalidArgumentError, match="Invalid key"):
        reader("a").set({"bad.key": 1})
    assert reader("/").get() is None  # a refused write changes nothing


def test_rest_status_codes_and_error_bodies(fake_rtdb):
    assert rest(fake_rtdb, "PUT", "/x.json", content=b"{bad").json() == {
        "error": "Invalid data; couldn't parse JSON object, array, or value."}
    assert rest(fake_rtdb, "PUT", "/x.json", content=b"NaN").status_code == 400
    assert rest(fake_rtdb, "PATCH", "/x.json", content=b"[1]").status_code == 400
    assert rest(fake_rtdb, "GET", "/a$b.json").json() == {"error": "Invalid path: Invalid token in path"}
    assert rest(fake_rtdb, "GET", "/x.json", params={"orderBy": '"$key"'}).status_code == 400
    missing = httpx.get(f"{fake_rtdb.url}/x.json", params={"ns": NAMESPACE}, timeout=10)
    assert (missing.status_code, missing.json()) == (401, {"error": "Permission denied"})
    wrong = rest(fake_rtdb, "GET", "/x.json", headers={"Authorization": "Bearer someone"})
    assert (wrong.status_code, wrong.json()) == (401, {"error": "Unauthorized request."})

    put = rest(fake_rtdb, "PUT", "/x.json", json={"a": 1})
    assert (put.status_code, put.json()) == (200, {"a": 1})
    silent = rest(fake_rtdb, "PATCH", "/x.json", json={"b": 2}, params={"print": "silent"})
    assert (silent.status_code, silent.content) == (204, b"")
    assert rest(fake_rtdb, "POST", "/x.json", json={"c": 3},
                headers={"X-HTTP-Method-Override": "PATCH"}).json() == {"c": 3}
    deleted = rest(fake_rtdb, "DELETE", "/x/a.json")
    assert (deleted.status_code, deleted.json()) == (200, None)
    assert rest(fake_rtdb, "GET", "/x.json").json() == {"b": 2, "c": 3}
    assert rest(fake_rtdb, "GET", "/x").status_code == 404


def test_canned_failures_and_bad_control_input(fake_rtdb, reader):
    fake_rtdb.control("fail", mode="status", status=500, error="boom", count=1, methods=["GET"])
    failed = rest(fake_rtdb, "GET", "/x.json")
    assert (failed.status_code, failed.json()) == (500, {"error": "boom"})
    assert rest(fake_rtdb, "GET", "/x.json").status_code == 200
    fake_rtdb.control("fail", mode="drop", count=None)
    with pytest.raises(exceptions.UnavailableError):
        reader("x").get()
    fake_rtdb.control("heal")
    assert reader("x").get() is None
    for body in ({"mode": "explode"}, {"status": 200}, {"count": 0}, {"methods": ["TRACE"]}):
        response = httpx.post(f"{fake_rtdb.url}/__fake__/fail", json=body, timeout=10)
        assert response.status_code == 400 and "error" in response.json()
    assert fake_rtdb.state()["faults"] == []

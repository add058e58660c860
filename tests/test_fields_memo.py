"""The memo of filtered answers: a body seen again is answered without filtering again,
and nothing one key, coding or snapshot was given reaches another."""

from __future__ import annotations

import gzip

import orjson
import pytest

from keyproxy.response.body_links import FieldsFactory, body_factories
from keyproxy.response.chain import ResponseHead
from keyproxy.response.fields import (
    FILTER_FAILED,
    FilterFailed,
    FilterLimits,
    FilterMemo,
    compile_fields,
    filter_encoded,
    parse_document_path,
)
from tests.test_body_links import EXCLUDE, SCRUBBER, SECRET, ctx_for, head_of, run

INCLUDE = compile_fields("include", ["id", "title"])
JSON = "application/json"


def records(n: int = 20, note: str = "") -> bytes:
    return orjson.dumps(
        [
            {
                "id": i,
                "title": f"t{i}",
                "email": f"e{i}@x",
                "author": {"name": "a", "phone": "p"},
                "note": note,
            }
            for i in range(n)
        ]
    )


def test_a_body_seen_again_is_answered_from_the_memo() -> None:
    memo = FilterMemo()
    body = records()
    first = filter_encoded(body, JSON, None, None, EXCLUDE, memo=memo)
    assert first == filter_encoded(body, JSON, None, None, EXCLUDE)
    assert len(memo) == 1
    # A new bytes object with the same content (as the next response brings) hits:
    # the very output object comes back, so nothing was parsed or written again.
    again = filter_encoded(bytes(bytearray(body)), JSON, None, None, EXCLUDE, memo=memo)
    assert again[0] is first[0] and again[1] is None
    assert len(memo) == 1


def test_one_byte_changed_is_a_miss_with_its_own_output() -> None:
    memo = FilterMemo()
    body = records()
    changed = body.replace(b'"t7"', b'"t8"', 1)
    assert len(changed) == len(body) and changed != body
    out, _ = filter_encoded(body, JSON, None, None, EXCLUDE, memo=memo)
    out_changed, _ = filter_encoded(changed, JSON, None, None, EXCLUDE, memo=memo)
    assert len(memo) == 2
    assert orjson.loads(out)[7]["title"] == "t7"
    assert orjson.loads(out_changed)[7]["title"] == "t8"
    assert filter_encoded(body, JSON, None, None, EXCLUDE, memo=memo)[0] is out


@pytest.mark.parametrize(
    "other",
    [
        {"flt": INCLUDE},
        {"flt": compile_fields("exclude", ["email"])},
        {"at": (parse_document_path("data[*]"),)},
        {"clean": SCRUBBER.scrub},
        {"limits": FilterLimits(max_depth=10)},
        {"content_type": "application/x-ndjson"},
    ],
    ids=["include", "fewer-paths", "fields_at", "scrubbed", "limits", "ndjson"],
)
def test_each_input_of_the_output_is_part_of_the_key(other: dict[str, object]) -> None:
    body = orjson.dumps({"data": [{"id": 1, "email": "e", "title": "x"}], "email": "top"})
    base: dict[str, object] = {
        "content_type": JSON,
        "content_encoding": None,
        "accept_encoding": None,
        "flt": EXCLUDE,
    }
    varied = {**base, **other}
    memo = FilterMemo()
    for _ in range(2):  # each answer again, in turn, from the memo
        assert filter_encoded(body, **base, memo=memo) == filter_encoded(body, **base)  # type: ignore[arg-type]
        assert filter_encoded(body, **varied, memo=memo) == filter_encoded(body, **varied)  # type: ignore[arg-type]
    assert len(memo) == 2


def test_a_secret_the_filter_would_spell_plainly_is_scrubbed_on_every_hit() -> None:
    body = ('[{"note": "\\u0075' + SECRET[1:] + '", "email": "x"}]').encode()
    memo = FilterMemo()
    plain = filter_encoded(body, JSON, None, None, EXCLUDE, memo=memo)[0]
    assert SECRET.encode() in plain  # unscrubbed route: the filter's output as it is
    for _ in range(2):
        out = filter_encoded(body, JSON, None, None, EXCLUDE, clean=SCRUBBER.scrub, memo=memo)[0]
        assert SECRET.encode() not in out and b"[REDACTED]" in out


def test_the_coding_chosen_for_the_client_is_part_of_the_key() -> None:
    body = gzip.compress(records())
    memo = FilterMemo()
    for _ in range(2):
        zipped, coding = filter_encoded(body, JSON, "gzip", "gzip, br", EXCLUDE, memo=memo)
        assert coding == "gzip" and b"email" not in gzip.decompress(zipped)
        plain, coding = filter_encoded(body, JSON, "gzip", None, EXCLUDE, memo=memo)
        assert coding is None and plain[:1] == b"[" and b"email" not in plain
        refused, coding = filter_encoded(body, JSON, "gzip", "gzip;q=0, br;q=0", EXCLUDE, memo=memo)
        assert coding is None and refused == plain
    # Two spellings of one choice share an entry: the key holds the coding chosen.
    filter_encoded(body, JSON, "gzip", "GZIP;q=0.5", EXCLUDE, memo=memo)
    assert len(memo) == 2
    # An identity upstream body is answered in identity whatever the client accepts.
    identity = records()
    assert filter_encoded(identity, JSON, None, "gzip", EXCLUDE, memo=memo)[1] is None
    assert filter_encoded(identity, JSON, "identity", "gzip", EXCLUDE, memo=memo)[1] is None


def test_the_bound_evicts_the_least_recently_used() -> None:
    bodies = [records(40, note=str(i)) for i in range(8)]
    entry = len(bodies[0]) + len(filter_encoded(bodies[0], JSON, None, None, EXCLUDE)[0]) + 256
    memo = FilterMemo(max_bytes=3 * entry + 100, max_entry_bytes=10 * entry)
    outs = [filter_encoded(b, JSON, None, None, EXCLUDE, memo=memo)[0] for b in bodies[:3]]
    assert len(memo) == 3
    assert (
        filter_encoded(bodies[0], JSON, None, None, EXCLUDE, memo=memo)[0] is outs[0]
    )  # now the newest
    filter_encoded(
        bodies[3], JSON, None, None, EXCLUDE, memo=memo
    )  # pushes out bodies[1], the oldest
    assert len(memo) == 3 and memo.size <= 3 * entry + 100
    assert filter_encoded(bodies[0], JSON, None, None, EXCLUDE, memo=memo)[0] is outs[0]
    again = filter_encoded(bodies[1], JSON, None, None, EXCLUDE, memo=memo)[0]
    assert again == outs[1] and again is not outs[1]  # filtered anew
    for body in bodies:
        filter_encoded(body, JSON, None, None, EXCLUDE, memo=memo)
        assert memo.size <= 3 * entry + 100


def test_an_answer_over_the_entry_bound_is_filtered_every_time() -> None:
    body = records(200)
    memo = FilterMemo(max_bytes=1 << 20, max_entry_bytes=len(body))
    first = filter_encoded(body, JSON, None, None, EXCLUDE, memo=memo)[0]
    second = filter_encoded(body, JSON, None, None, EXCLUDE, memo=memo)[0]
    assert first == second and first is not second and len(memo) == 0


@pytest.mark.parametrize(
    ("body", "limits"),
    [
        (b'[{"id": 1', FilterLimits()),
        (b"[" * 30 + b"]" * 30, FilterLimits(max_depth=10)),
        (b'{"a":"' + b"x" * 5000 + b'"}', FilterLimits(2048)),
    ],
    ids=["truncated", "too-deep", "too-large"],
)
def test_a_failure_is_not_remembered_and_fails_every_time(
    body: bytes, limits: FilterLimits
) -> None:
    memo = FilterMemo()
    for _ in range(2):
        with pytest.raises(FilterFailed):
            filter_encoded(body, JSON, None, None, EXCLUDE, limits=limits, memo=memo)
    assert len(memo) == 0


def test_a_hit_edits_the_head_as_the_miss_did() -> None:
    """Through the link: same output, same Content-Encoding and Vary, miss or hit."""
    body = gzip.compress(records())
    fields = FieldsFactory(FilterLimits())
    seen = []
    for accept in ("gzip", "gzip", None, None, "br", "br"):
        head = head_of(
            b"Content-Type: application/json",
            b"Content-Encoding: gzip",
            b"Vary: Origin",
            b'ETag: "v1"',
            length=len(body),
        )
        out = run([fields(ctx_for(EXCLUDE, accept=accept))], head, [body[:100], body[100:]])
        assert isinstance(out, bytes)
        seen.append((out, head.lines))
    assert len(fields.memo) == 3
    for miss, hit in zip(seen[::2], seen[1::2], strict=True):
        assert hit == miss
    heads = [b"".join(lines).lower() for _, lines in seen]
    assert heads[0] == (
        b"content-type: application/json\r\n"
        b"content-encoding: gzip\r\n"
        b"vary: origin, accept-encoding\r\n"
        b"cache-control: private\r\n"
    )
    assert b"content-encoding" not in heads[2] and b"content-encoding: br\r\n" in heads[4]


def test_the_raw_body_is_still_counted_against_the_limit_on_a_hit() -> None:
    """The memo answers only what was received whole within the limit: the same bytes
    sent in more chunks than the cap allows is refused as before, never served."""
    body = records(5)
    fields = FieldsFactory(FilterLimits(max_bytes=len(body)))
    assert isinstance(
        run([fields(ctx_for(EXCLUDE))], head_of(b"Content-Type: application/json"), [body]), bytes
    )
    assert len(fields.memo) == 1
    over = run([fields(ctx_for(EXCLUDE))], head_of(b"Content-Type: application/json"), [body, b" "])
    assert over is FILTER_FAILED


def _config(fields: str) -> object:
    from keyproxy.config import parse_config

    key = f'{{id: k, hash: "sha256:{"0" * 64}", type: read, acls: [all], fields: {fields}}}'
    text = 'upstream:\n  url: http://127.0.0.1:9\nroutes:\n  - {match: "GET /x", acl: all}\n'
    return parse_config(text + "keys:\n  - " + key + "\n", "t.yaml", {})


def test_each_snapshot_starts_with_an_empty_memo() -> None:
    config = _config("{exclude: [email]}")
    (before,) = [f for f in body_factories(config, None) if isinstance(f, FieldsFactory)]  # type: ignore[arg-type]
    run([before(ctx_for(EXCLUDE))], head_of(b"Content-Type: application/json"), [records()])
    assert len(before.memo) == 1
    # A reload builds the snapshot's factories anew: the same config or a changed one.
    for text in ("{exclude: [email]}", "{include: [id]}"):
        (after,) = [
            f
            for f in body_factories(_config(text), None)  # type: ignore[arg-type]
            if isinstance(f, FieldsFactory)
        ]
        assert after.memo is not before.memo and len(after.memo) == 0


def test_a_link_without_a_memo_filters_every_time() -> None:
    from keyproxy.response.body_links import FieldsLink

    body = records()
    outs = []
    for _ in range(2):
        link = FieldsLink(EXCLUDE, (), FilterLimits(), ctx_for(EXCLUDE))
        head = ResponseHead(200, [b"Content-Type: application/json\r\n"], len(body), "GET")
        assert link.on_head(head) is None
        link.on_body(body)
        outs.append(link.on_end())
    assert outs[0] == outs[1] and outs[0] is not outs[1]


def test_the_upstream_coding_is_part_of_the_key() -> None:
    """The same bytes declared gzip are not the JSON they were as identity: refused."""
    body = records()
    memo = FilterMemo()
    filter_encoded(body, JSON, None, None, EXCLUDE, memo=memo)
    for coding in ("gzip", "br"):
        with pytest.raises(FilterFailed):
            filter_encoded(body, JSON, coding, None, EXCLUDE, memo=memo)
    assert len(memo) == 1


def test_each_answer_is_counted_as_a_hit_a_miss_or_a_bypass() -> None:
    """What `keyproxy_fields_memo_requests_total{result}` counts, summed over workers."""
    from keyproxy.observe import Metrics, merge

    metrics = Metrics()
    memo = FilterMemo(
        max_bytes=1 << 20, max_entry_bytes=len(records(50)), count=metrics.fields_memo
    )
    for body in (records(), records(), records(note="x"), records(200), records()):
        filter_encoded(body, JSON, None, None, EXCLUDE, memo=memo)
    assert metrics.fields_memo_results == {"miss": 2, "hit": 2, "bypass": 1}
    summed = merge([metrics.snapshot(), metrics.snapshot()])
    assert summed["fields_memo"] == {"miss": 4, "hit": 4, "bypass": 2}

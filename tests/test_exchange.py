"""Pairing server answers with client requests (pure logic: the sequences PostgreSQL sends)."""

from __future__ import annotations

import pytest

from pgleap.protocol import codes
from pgleap.upgrade.capture.exchange import ExchangeError, ExchangeTracker, Outcome, Request

Q, P, B, D, E, C, S, H, F = (ord(c) for c in "QPBDECSHF")


def feed(tracker: ExchangeTracker, answers: str, bodies: dict[int, bytes] | None = None) -> list[tuple[int, Outcome]]:
    """Feed server message types (one char each); return (request kind, outcome) per message."""
    out = []
    for i, ch in enumerate(answers):
        request, outcome = tracker.received(ord(ch), (bodies or {}).get(i, b""))
        out.append((request.kind if request else 0, outcome))
    return out


def test_simple_query_with_two_statements_collects_tags() -> None:
    t = ExchangeTracker()
    query = Request(Q)
    t.sent(query)
    tags = []
    for kind, body in [("T", b""), ("D", b""), ("C", b"SELECT 1\0"), ("C", b"INSERT 0 1\0")]:
        request, outcome = t.received(ord(kind), body)
        assert request is query and outcome is Outcome.PART
        if kind == "C":
            tags.append(query.tag)
    assert tags == ["SELECT 1", "INSERT 0 1"]
    assert t.received(ord("Z"))[1] is Outcome.DONE and t.outstanding == 0


def test_extended_batch_each_request_completes_in_order() -> None:
    t = ExchangeTracker()
    requests = [Request(P), Request(B), Request(D, describe_statement=False), Request(E), Request(S)]
    for r in requests:
        t.sent(r)
    t.sent(Request(H))  # Flush expects nothing
    results = feed(t, "12TDDCZ", {5: b"SELECT 2\0"})
    assert results == [
        (P, Outcome.DONE),
        (B, Outcome.DONE),
        (D, Outcome.DONE),
        (E, Outcome.PART),
        (E, Outcome.PART),
        (E, Outcome.DONE),
        (S, Outcome.DONE),
    ]
    assert requests[3].tag == "SELECT 2" and t.outstanding == 0


def test_describe_statement_gets_parameter_description_first() -> None:
    t = ExchangeTracker()
    t.sent(Request(D, describe_statement=True))
    assert feed(t, "tn") == [(D, Outcome.PART), (D, Outcome.DONE)]


def test_error_in_extended_batch_skips_to_sync() -> None:
    """After an ErrorResponse the server ignores everything up to Sync: those requests get no answer."""
    t = ExchangeTracker()
    parse, bind, execute, probe, sync = Request(P), Request(B), Request(E), Request(E, injected=True), Request(S)
    for r in (parse, bind, execute, probe, sync):
        t.sent(r)
    assert feed(t, "12") == [(P, Outcome.DONE), (B, Outcome.DONE)]
    request, outcome = t.received(codes.ERROR_RESPONSE)
    assert request is execute and outcome is Outcome.FAILED
    request, outcome = t.received(codes.READY_FOR_QUERY)
    assert request is sync and outcome is Outcome.DONE and t.outstanding == 0


def test_error_in_simple_query_still_waits_for_ready() -> None:
    t = ExchangeTracker()
    query = Request(Q, injected=True, context="probe")
    t.sent(query)
    request, outcome = t.received(codes.ERROR_RESPONSE)
    assert request is query and outcome is Outcome.FAILED
    request, outcome = t.received(codes.READY_FOR_QUERY)
    assert request is not None and request.injected and request.context == "probe" and outcome is Outcome.DONE


def test_copy_in_through_simple_query() -> None:
    t = ExchangeTracker()
    t.sent(Request(Q))
    for kind in (codes.COPY_DATA, codes.COPY_DATA, codes.COPY_DONE):
        t.sent(Request(kind))  # the client's copy stream expects no answers of its own
    results = feed(t, "GCZ", {1: b"COPY 2\0"})
    assert [o for _, o in results] == [Outcome.PART, Outcome.PART, Outcome.DONE]


def test_copy_out_through_extended_execute() -> None:
    t = ExchangeTracker()
    execute = Request(E)
    t.sent(execute)
    t.sent(Request(S))
    results = feed(t, "HddcCZ", {4: b"COPY 2\0"})
    assert [o for _, o in results] == [Outcome.PART] * 4 + [Outcome.DONE, Outcome.DONE]
    assert execute.tag == "COPY 2"


def test_async_messages_belong_to_no_request() -> None:
    t = ExchangeTracker()
    t.sent(Request(Q))
    assert t.received(ord("N")) == (None, Outcome.ASYNC)
    assert t.received(ord("A")) == (None, Outcome.ASYNC)
    assert t.received(ord("S")) == (None, Outcome.ASYNC)
    assert t.outstanding == 1


def test_function_call() -> None:
    t = ExchangeTracker()
    t.sent(Request(F))
    assert feed(t, "VZ") == [(F, Outcome.PART), (F, Outcome.DONE)]


@pytest.mark.parametrize(("sent", "answer"), [(P, "2"), (B, "1"), (S, "C")])
def test_an_answer_that_does_not_fit_is_an_error(sent: int, answer: str) -> None:
    t = ExchangeTracker()
    t.sent(Request(sent))
    with pytest.raises(ExchangeError, match="where"):
        t.received(ord(answer))


def test_an_answer_with_nothing_outstanding_is_an_error() -> None:
    with pytest.raises(ExchangeError, match="no request outstanding"):
        ExchangeTracker().received(codes.READY_FOR_QUERY)

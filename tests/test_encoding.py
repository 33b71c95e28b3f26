"""Re-encoding captured parameters and COPY data from the session's client_encoding to replay's UTF-8."""

from __future__ import annotations

import codecs

from pgleap.upgrade.capture.encoding import CODECS, codec_for, to_utf8

TEXT, BYTEA, INT4, UNKNOWN, USER_TYPE = 25, 17, 23, 0, 16400


def test_utf8_sql_ascii_and_ascii_payloads_are_left_as_they_are() -> None:
    params = ("é".encode(), b"\xff\x00")
    assert to_utf8("UTF8", "x", params, (), (), b"\xe9").params == params
    assert to_utf8("SQL_ASCII", "x", params, (), (), b"\xe9").copy_data == b"\xe9"  # its server converts nothing
    same = to_utf8("WIN1251", "x", (b"plain", None), (), (), b"1\tabc\n")
    assert same.params == (b"plain", None) and same.copy_data == b"1\tabc\n" and same.problem is None


def test_text_format_parameters_and_text_copy_data_are_re_encoded() -> None:
    data = "Zürich\n".encode("latin-1")
    recoded = to_utf8("LATIN1", "copy t from stdin", ("café".encode("latin-1"), None), (), (), data)
    assert recoded.params == ("café".encode(), None)
    assert recoded.copy_data == "Zürich\n".encode()
    assert recoded.problem is None
    cyrillic = to_utf8("win1251", "x", ("привет".encode("cp1251"),), (0,), (UNKNOWN,), None)
    assert cyrillic.params == ("привет".encode(),)


def test_binary_parameters_are_re_encoded_only_when_their_type_is_text() -> None:
    latin = "ñ".encode("latin-1")
    recoded = to_utf8(
        "LATIN1", "x", (latin, b"\xe9\x00\xff", (200).to_bytes(4, "big")), (1,), (TEXT, BYTEA, INT4), None
    )
    assert recoded.params == ("ñ".encode(), b"\xe9\x00\xff", (200).to_bytes(4, "big"))
    assert recoded.problem is None


def test_what_cannot_be_told_apart_is_kept_and_reported() -> None:
    unknown = to_utf8("LATIN1", "x", (b"ok", b"\xe9"), (0, 1), (TEXT, UNKNOWN), None)
    assert unknown.params == (b"ok", b"\xe9")
    assert unknown.problem is not None and "binary parameter $2" in unknown.problem and "LATIN1" in unknown.problem
    enum = to_utf8("LATIN1", "x", (b"\xe9",), (1,), (USER_TYPE,), None)
    assert enum.problem is not None and "$1" in enum.problem
    binary_copy = to_utf8("LATIN1", "COPY t FROM STDIN (FORMAT binary)", (), (), (), b"PGCOPY\n\xff")
    assert binary_copy.copy_data == b"PGCOPY\n\xff"
    assert binary_copy.problem is not None and "binary COPY" in binary_copy.problem
    no_codec = to_utf8("MULE_INTERNAL", "x", (b"\x81\xe9",), (), (), None)
    assert no_codec.params == (b"\x81\xe9",) and no_codec.problem is not None and "MULE_INTERNAL" in no_codec.problem


def test_bytes_python_cannot_read_in_that_encoding_are_kept_and_reported() -> None:
    recoded = to_utf8("EUC_JP", "x", (b"\xff\xff",), (), (), None)
    assert recoded.params == (b"\xff\xff",)
    assert recoded.problem is not None and "parameter $1" in recoded.problem


def test_every_encoding_has_a_codec_python_knows() -> None:
    for name, codec in CODECS.items():
        assert codecs.lookup(codec), name  # a LookupError here is a wrong codec name
    assert codec_for("latin1") == "latin-1"
    assert codec_for("MULE_INTERNAL") == "latin-1"  # read byte for byte; its payloads are reported


def test_copy_format_is_read_from_the_parsed_options_not_the_text() -> None:
    latin = "Zürich\n".encode("latin-1")
    for binary in ("COPY t FROM STDIN BINARY", "COPY BINARY t FROM STDIN", "copy t from stdin (format BINARY)"):
        kept = to_utf8("LATIN1", binary, (), (), (), latin)
        assert kept.copy_data == latin and kept.problem is not None and "binary COPY" in kept.problem, binary
    # A column, table or CSV option named "binary" is not the format: the data is text, re-encoded.
    for text in ('COPY t ("binary") FROM STDIN', 'COPY "binary" FROM STDIN (FORMAT csv)'):
        recoded = to_utf8("LATIN1", text, (), (), (), latin)
        assert recoded.copy_data == "Zürich\n".encode() and recoded.problem is None, text
    # A COPY pglast cannot parse cannot be told apart: kept as sent and reported.
    odd = to_utf8("LATIN1", "COPY t FROM STDIN WITH OIDS WITH", (), (), (), latin)
    assert odd.copy_data == latin and odd.problem is not None

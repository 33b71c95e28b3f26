"""What a statement sent in the session's client_encoding must become for replay, whose session speaks UTF-8.

Statement text is decoded as it arrives, so only the bytes capture keeps as they came need re-encoding: Bind
parameters and COPY FROM STDIN data. The server converts those from client_encoding exactly when they are text:
every text-format parameter, binary-format parameters of the string types (their wire form is the string), and
COPY data in text or CSV format. Binary bytes of other types are left alone; a binary parameter of a type not
known here, or binary COPY data, that holds non-ASCII bytes cannot be told apart and is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgleap.protocol.codes import FIRST_USER_OID
from pgleap.upgrade.capture.classify import copy_is_binary

# PostgreSQL client_encoding names and the Python codecs that read them. SQL_ASCII is absent on purpose: its
# server does no conversion, so its bytes replay as they are. An encoding without a codec is read as latin-1
# (which keeps every byte) so that classification still works, and its non-ASCII payloads are reported.
CODECS = {
    "UTF8": "utf-8",
    "LATIN1": "latin-1",
    "LATIN2": "iso8859-2",
    "LATIN3": "iso8859-3",
    "LATIN4": "iso8859-4",
    "LATIN5": "iso8859-9",
    "LATIN6": "iso8859-10",
    "LATIN7": "iso8859-13",
    "LATIN8": "iso8859-14",
    "LATIN9": "iso8859-15",
    "LATIN10": "iso8859-16",
    "ISO_8859_5": "iso8859-5",
    "ISO_8859_6": "iso8859-6",
    "ISO_8859_7": "iso8859-7",
    "ISO_8859_8": "iso8859-8",
    "WIN866": "cp866",
    "WIN874": "cp874",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "WIN1253": "cp1253",
    "WIN1254": "cp1254",
    "WIN1255": "cp1255",
    "WIN1256": "cp1256",
    "WIN1257": "cp1257",
    "WIN1258": "cp1258",
    "KOI8R": "koi8-r",
    "KOI8U": "koi8-u",
    "EUC_JP": "euc_jp",
    "EUC_JIS_2004": "euc_jis_2004",
    "EUC_CN": "gb2312",
    "EUC_KR": "euc_kr",
    "SJIS": "cp932",
    "SHIFT_JIS_2004": "shift_jis_2004",
    "BIG5": "big5",
    "GBK": "gbk",
    "GB18030": "gb18030",
    "UHC": "cp949",
    "JOHAB": "johab",
}
_PASS_THROUGH = frozenset(["UTF8", "SQL_ASCII"])  # nothing to re-encode

# Built-in types whose binary wire form is text in client_encoding (their receive functions convert it): "char",
# name, text, json, xml, bpchar, varchar, jsonb (a version byte, then text). Other built-in types are bytes.
_STRING_TYPES = frozenset([18, 19, 25, 114, 142, 1042, 1043, 3802])


def codec_for(client_encoding: str) -> str:
    """The Python codec that reads a client_encoding (latin-1 when Python has none)."""
    return CODECS.get(client_encoding.upper(), "latin-1")


@dataclass(frozen=True)
class Recoded:
    """A statement's parameters and COPY data as UTF-8, and what could not be re-encoded."""

    params: tuple[bytes | None, ...]
    copy_data: bytes | None
    problem: str | None = None


def to_utf8(
    client_encoding: str,
    sql: str,
    params: tuple[bytes | None, ...],
    param_formats: tuple[int, ...],
    param_types: tuple[int, ...],
    copy_data: bytes | None,
) -> Recoded:
    """`params` and `copy_data`, sent in `client_encoding`, as the server read them, in UTF-8."""
    name = client_encoding.upper()
    if name in _PASS_THROUGH or (all(p is None or p.isascii() for p in params) and (copy_data or b"").isascii()):
        return Recoded(params, copy_data)  # ASCII is the same in every client_encoding PostgreSQL allows
    codec = CODECS.get(name)
    if codec is None:
        problem = f"non-ASCII parameters or COPY data in client_encoding {client_encoding}: pgleap cannot re-encode it"
        return Recoded(params, copy_data, problem)
    out: list[bytes | None] = []
    problems: list[str] = []
    for i, value in enumerate(params):
        if value is None or value.isascii():
            out.append(value)
            continue
        binary = _format_of(param_formats, i) == 1
        type_oid = param_types[i] if i < len(param_types) else 0
        if not binary or type_oid in _STRING_TYPES:
            out.append(_recode(value, codec, f"parameter ${i + 1}", problems))
        else:
            if type_oid == 0 or type_oid >= FIRST_USER_OID:
                problems.append(f"binary parameter ${i + 1} of a type pgleap cannot tell holds non-ASCII bytes")
            out.append(value)  # bytea and the other binary forms are not text
    data = copy_data
    if copy_data is not None and not copy_data.isascii():
        if copy_is_binary(sql):
            problems.append("binary COPY data holds non-ASCII bytes")
        else:
            data = _recode(copy_data, codec, "COPY data", problems)
    joined = f"{'; '.join(problems)} (client_encoding {client_encoding})" if problems else None
    return Recoded(tuple(out), data, joined)


def _recode(value: bytes, codec: str, what: str, problems: list[str]) -> bytes:
    try:
        return value.decode(codec).encode()
    except UnicodeDecodeError:
        # The server accepted it, so Python's table for this encoding differs from PostgreSQL's here.
        problems.append(f"{what} is not valid {codec} as Python reads it")
        return value


def _format_of(formats: tuple[int, ...], index: int) -> int:
    # Bind: no format codes means all text, one applies to every parameter, else one each.
    if not formats:
        return 0
    return formats[0] if len(formats) == 1 else formats[index]


__all__ = ["CODECS", "Recoded", "codec_for", "to_utf8"]

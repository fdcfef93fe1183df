"""multipart/form-data encoding (requests) and decoding (MONAI Label's infer responses).

Written against RFC 7578 (multipart/form-data) and RFC 2046 section 5.1 (the multipart body):

    body  = *( "--" boundary CRLF headers CRLF CRLF content CRLF ) "--" boundary "--" CRLF

Standard library only (``cgi`` was removed in Python 3.13), Python 3.9 syntax.
"""

import os
import re
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

CRLF = b"\r\n"

# RFC 2046: 1 to 70 characters from this set, not ending with a space
_BOUNDARY_PATTERN = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")


class FilePart(NamedTuple):
    """A file to upload: its name as the server should see it, its bytes and its media type."""

    filename: str
    content: bytes
    content_type: str = "application/octet-stream"


class Part(NamedTuple):
    """One decoded part of a multipart body."""

    name: str
    filename: Optional[str]
    content_type: str
    content: bytes

    def text(self) -> str:
        return self.content.decode("utf-8")


def _quote_parameter(value: str) -> str:
    """Percent-encode the three characters that would break a quoted header parameter (HTML's form encoding)."""
    return value.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")


def _new_boundary() -> str:
    return "lungnlb-" + os.urandom(16).hex()


def encode_multipart(
    fields: Optional[Mapping[str, str]] = None,
    files: Optional[Mapping[str, FilePart]] = None,
    boundary: Optional[str] = None,
) -> Tuple[bytes, str]:
    """Encode text fields and files as a multipart/form-data body.

    Returns ``(body, content_type)`` where content_type carries the boundary. A random boundary is drawn
    until it occurs in none of the contents; an explicit ``boundary`` that occurs in a content is a ValueError.
    """
    fields = dict(fields or {})
    files = dict(files or {})
    contents = [value.encode("utf-8") for value in fields.values()] + [part.content for part in files.values()]
    if boundary is None:
        boundary = _new_boundary()
        while any(boundary.encode("ascii") in content for content in contents):
            boundary = _new_boundary()
    elif not _BOUNDARY_PATTERN.match(boundary):
        raise ValueError(f"invalid multipart boundary {boundary!r}: 1-70 characters of RFC 2046's set")
    elif any(boundary.encode("ascii") in content for content in contents):
        raise ValueError(f"multipart boundary {boundary!r} occurs inside a part's content")

    delimiter = b"--" + boundary.encode("ascii")
    chunks: List[bytes] = []
    for name, value in fields.items():
        disposition = f'form-data; name="{_quote_parameter(name)}"'
        chunks += [delimiter, CRLF, b"Content-Disposition: ", disposition.encode("utf-8"), CRLF, CRLF]
        chunks += [value.encode("utf-8"), CRLF]
    for name, part in files.items():
        disposition = f'form-data; name="{_quote_parameter(name)}"; filename="{_quote_parameter(part.filename)}"'
        chunks += [delimiter, CRLF, b"Content-Disposition: ", disposition.encode("utf-8"), CRLF]
        chunks += [b"Content-Type: ", part.content_type.encode("ascii"), CRLF, CRLF, part.content, CRLF]
    chunks += [delimiter, b"--", CRLF]
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def parse_header_parameters(value: str) -> Tuple[str, Dict[str, str]]:
    """Split a header value such as ``form-data; name="a"; filename="b;c.nii"`` into its main value and parameters.

    Handles quoted strings (with backslash escapes and ``;`` inside quotes) and RFC 5987 ``name*=utf-8''...``
    parameters, which take precedence over their plain form. Parameter names are lower-cased.
    """
    main, rest = _read_token(value, 0, ";")
    params: Dict[str, str] = {}
    extended: Dict[str, str] = {}
    position = rest
    while position < len(value):
        position += 1  # skip ';'
        key, position = _read_token(value, position, "=;")
        key = key.strip().lower()
        if position >= len(value) or value[position] == ";":
            if key:
                params[key] = ""
            continue
        position += 1  # skip '='
        raw, position = _read_value(value, position)
        if key.endswith("*"):
            extended[key[:-1]] = _decode_rfc5987(raw)
        elif key:
            params[key] = raw
    params.update(extended)
    return main.strip().lower(), params


def _read_token(text: str, start: int, stops: str) -> Tuple[str, int]:
    end = start
    while end < len(text) and text[end] not in stops:
        end += 1
    return text[start:end], end


def _read_value(text: str, start: int) -> Tuple[str, int]:
    while start < len(text) and text[start] in " \t":
        start += 1
    if start < len(text) and text[start] == '"':
        chars: List[str] = []
        position = start + 1
        while position < len(text) and text[position] != '"':
            if text[position] == "\\" and position + 1 < len(text):
                position += 1
            chars.append(text[position])
            position += 1
        # skip the closing quote and anything up to the next ';'
        _, position = _read_token(text, position + 1, ";")
        return "".join(chars), position
    token, position = _read_token(text, start, ";")
    return token.strip(), position


def _decode_rfc5987(raw: str) -> str:
    from urllib.parse import unquote

    charset, _, rest = raw.partition("'")
    _, _, encoded = rest.partition("'")
    return unquote(encoded, encoding=charset or "utf-8", errors="replace")


def boundary_from_content_type(content_type: str) -> str:
    """The boundary parameter of a multipart Content-Type header; ValueError when it is not multipart or lacks one."""
    kind, params = parse_header_parameters(content_type)
    if not kind.startswith("multipart/"):
        raise ValueError(f"expected a multipart Content-Type, got {content_type!r}")
    boundary = params.get("boundary", "")
    if not boundary:
        raise ValueError(f"multipart Content-Type without a boundary: {content_type!r}")
    return boundary


def decode_multipart(body: bytes, content_type: str) -> List[Part]:
    """Decode a multipart body into its parts, in order.

    The preamble before the first delimiter and the epilogue after the closing one are ignored. A body
    without its closing delimiter, or a part without a blank line after its headers, is a ValueError.
    """
    delimiter = b"--" + boundary_from_content_type(content_type).encode("ascii")
    start = _find_delimiter(body, delimiter, 0)
    if start < 0:
        raise ValueError("multipart body does not contain its boundary")
    parts: List[Part] = []
    position = start + len(delimiter)
    while True:
        if body.startswith(b"--", position):
            return parts
        line_end = body.find(CRLF, position)
        if line_end < 0:
            raise ValueError("multipart body ends inside a delimiter line")
        part_start = line_end + 2
        next_delimiter = _find_delimiter(body, delimiter, part_start)
        if next_delimiter < 0:
            raise ValueError("multipart body has no closing boundary (truncated response?)")
        # the CRLF before a delimiter belongs to the delimiter (RFC 2046)
        part_end = next_delimiter - 2 if body[next_delimiter - 2 : next_delimiter] == CRLF else next_delimiter
        parts.append(_decode_part(body[part_start:part_end]))
        position = next_delimiter + len(delimiter)


def _find_delimiter(body: bytes, delimiter: bytes, start: int) -> int:
    """Index of a delimiter that starts the body or a line, -1 when there is none."""
    position = start
    while True:
        found = body.find(delimiter, position)
        if found < 0 or found == 0 or body[found - 2 : found] == CRLF:
            return found
        position = found + 1


def _decode_part(raw: bytes) -> Part:
    header_end = raw.find(CRLF + CRLF)
    if raw.startswith(CRLF):
        header_block, content = b"", raw[2:]
    elif header_end < 0:
        raise ValueError("multipart part has no blank line after its headers")
    else:
        header_block, content = raw[:header_end], raw[header_end + 4 :]
    headers: Dict[str, str] = {}
    for line in header_block.decode("utf-8", errors="replace").split("\r\n"):
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    _, disposition = parse_header_parameters(headers.get("content-disposition", ""))
    return Part(
        name=disposition.get("name", ""),
        filename=disposition.get("filename"),
        content_type=headers.get("content-type", "text/plain"),
        content=content,
    )

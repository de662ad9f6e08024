"""Other multipart parsers, as a provider built on them would read a form: the tests
compare what they read with what the gateway checked."""

from __future__ import annotations

import email.parser
import email.policy
from typing import Any, Callable

from python_multipart.multipart import MultipartParser, parse_options_header


def email_reading(content_type: str, body: bytes) -> tuple[int, list[bytes]]:
    """(number of parts, values of the parts named "model") as Python's email package reads them."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("ascii") + b"\r\n\r\n" + body)
    assert message.is_multipart() and not message.defects, message.defects
    # walk(), not just the top-level parts: a model part nested in another part counts too.
    return len(list(message.iter_parts())), [
        p.get_payload(decode=True) for p in message.walk()
        if not p.is_multipart() and p.get_param("name", header="content-disposition") == "model"]


def python_multipart_reading(content_type: str, body: bytes) -> tuple[int, list[bytes]]:
    """The same, as python-multipart reads them (the last Content-Disposition wins, as it did in request.py)."""
    _, options = parse_options_header(content_type)
    parts: list[dict[str, Any]] = []
    header = {"name": b"", "value": b""}

    def on_part_begin() -> None:
        parts.append({"disposition": b"", "data": b""})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        if header["name"].lower() == b"content-disposition":
            parts[-1]["disposition"] = header["value"]
        header["name"] = header["value"] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"] += data[start:end]

    callbacks: dict[str, Callable[..., None]] = {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data}
    parser = MultipartParser(options[b"boundary"], callbacks)  # type: ignore[arg-type]
    parser.write(body)
    parser.finalize()
    return len(parts), [p["data"] for p in parts if parse_options_header(p["disposition"])[1].get(b"name") == b"model"]

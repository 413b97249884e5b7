"""Property tests for the parsers every request goes through: they accept exactly the
grammar, never crash, and what they accept is safe to build a path from."""

from __future__ import annotations

import re
import string

from hypothesis import given
from hypothesis import strategies as st

from cache.digests import Digest
from proxy.errors import DigestInvalid, NameInvalid, RangeNotSatisfiable, RegistryError, TagInvalid
from proxy.ranges import parse_range
from proxy.references import check_repository, parse_digest, parse_reference
from proxy.upstream_auth import parse_challenges

COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
OCI_NAME = re.compile(rf"{COMPONENT}(?:/{COMPONENT})*")
OCI_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")

anything = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
near_names = st.text(alphabet=string.ascii_letters + string.digits + "._-/%:@\x00é ", max_size=80)


@given(st.one_of(anything, near_names, st.from_regex(OCI_NAME, fullmatch=True)))
def test_repository_names_follow_the_oci_grammar(name: str) -> None:
    valid = bool(OCI_NAME.fullmatch(name)) and len(name) <= 255
    try:
        assert check_repository(name) == name
        accepted = True
    except NameInvalid:
        accepted = False
    assert accepted == valid
    if accepted:
        assert ".." not in name.split("/") and "\x00" not in name and not name.startswith("/")


@given(
    st.one_of(
        anything,
        st.from_regex(OCI_TAG, fullmatch=True),
        st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True),
    )
)
def test_references_are_a_tag_or_a_digest_or_refused(text: str) -> None:
    try:
        ref = parse_reference(text)
    except (TagInvalid, DigestInvalid):
        assert not OCI_TAG.fullmatch(text) and not re.fullmatch(
            r"sha(256:[0-9a-f]{64}|512:[0-9a-f]{128})", text
        )
        return
    if isinstance(ref, Digest):
        assert str(ref) == text and re.fullmatch(r"[0-9a-f]+", ref.hex)
    else:
        assert OCI_TAG.fullmatch(ref)


@given(st.one_of(anything, st.from_regex(r"sha(256|512):[0-9a-fA-F]{60,130}", fullmatch=True)))
def test_digests_are_lowercase_hex_of_the_right_length(text: str) -> None:
    try:
        digest = parse_digest(text)
    except DigestInvalid:
        return
    assert len(digest.hex) == {"sha256": 64, "sha512": 128}[digest.algorithm]
    assert digest.hex == digest.hex.lower() and "/" not in digest.hex


@given(st.text(max_size=400))
def test_challenge_parsing_never_crashes_and_keeps_its_shape(header: str) -> None:
    for challenge in parse_challenges(header):
        assert challenge.scheme == challenge.scheme.lower() and challenge.scheme
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in challenge.params.items())


@given(
    st.sampled_from(["Bearer", "bearer", "Basic"]),
    st.dictionaries(
        st.sampled_from(["realm", "service", "scope", "error"]),
        st.text(alphabet=string.printable.replace('"', "").replace("\\", ""), max_size=40),
        max_size=4,
    ),
)
def test_challenge_parsing_round_trips_quoted_params(scheme: str, params: dict[str, str]) -> None:
    header = scheme + " " + ",".join(f'{k}="{v}"' for k, v in params.items())
    (challenge,) = parse_challenges(header)
    assert challenge.scheme == scheme.lower()
    assert challenge.params == params


@given(
    st.one_of(st.text(max_size=60), st.from_regex(r"bytes=\d{0,20}-\d{0,20}", fullmatch=True)),
    st.integers(0, 10**12),
)
def test_range_parsing_is_strict_and_in_bounds(header: str, size: int) -> None:
    try:
        span = parse_range(header, size)
    except RangeNotSatisfiable as exc:
        assert exc.headers["Content-Range"] == f"bytes */{size}"
        return
    except RegistryError as exc:  # pragma: no cover - any other error is a bug
        raise AssertionError(f"unexpected {exc!r}") from exc
    if span is not None:
        start, stop = span
        assert 0 <= start < stop <= size
        assert re.fullmatch(r"bytes=\d*-\d*", header.strip())

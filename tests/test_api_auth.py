"""The HTTP API's bearer token file and header check."""

from __future__ import annotations

import os

import pytest

from rmbgd.api.auth import Token, TokenFileError, authorized, read_token


def token_file(tmp_path, content: bytes, mode: int = 0o600):
    path = tmp_path / "token"
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


def test_token_is_the_file_without_surrounding_whitespace(tmp_path):
    token = read_token(token_file(tmp_path, b"  s3cr3t-Token_1\n"))
    assert token == Token(b"s3cr3t-Token_1", None)


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604])
def test_a_token_file_others_can_read_gives_a_warning(tmp_path, mode):
    token = read_token(token_file(tmp_path, b"abc\n", mode))
    assert token.value == b"abc"
    assert "can be read by other users" in token.warning and f"{mode:o}" in token.warning


@pytest.mark.parametrize(
    "content, problem",
    [(b"\n \n", "is empty"), (b"two words\n", "one word of printable ASCII"), (b"caf\xc3\xa9", "printable ASCII"),
     (b"x" * 70_000, "over 64 KiB")],
)
def test_unusable_token_files(tmp_path, content, problem):
    with pytest.raises(TokenFileError, match=problem):
        read_token(token_file(tmp_path, content))


def test_missing_token_file(tmp_path):
    with pytest.raises(TokenFileError, match=r"http.token_file: cannot read .*token: No such file"):
        read_token(tmp_path / "token")


def test_a_folder_is_not_a_token_file(tmp_path):
    with pytest.raises(TokenFileError, match="not a regular file|Is a directory"):
        read_token(tmp_path)


TOKEN = Token(b"s3cr3t")


@pytest.mark.parametrize(
    "header, ok",
    [
        ("Bearer s3cr3t", True),
        ("bearer s3cr3t", True),
        ("Bearer  s3cr3t ", True),
        ("Bearer s3cr3", False),
        ("Bearer s3cr3tt", False),
        ("Basic s3cr3t", False),
        ("s3cr3t", False),
        ("Bearer", False),
        ("", False),
        (None, False),
        ("Bearer s3cr3\u00e9", False),
    ],
)
def test_authorization_header(header, ok):
    assert authorized(header, TOKEN) is ok

import pytest

import buntsession
from buntsession import CorruptFileError, Error, FileLockedError, SessionTypeError, StoreError


def test_every_error_derives_from_error() -> None:
    for cls in (CorruptFileError, FileLockedError, StoreError, SessionTypeError):
        assert issubclass(cls, Error)
    assert issubclass(SessionTypeError, TypeError)


def test_corrupt_file_error_carries_path_and_offset() -> None:
    err = CorruptFileError("/tmp/x.db", 123, "checksum mismatch")
    assert err.path == "/tmp/x.db"
    assert err.offset == 123
    assert "123" in str(err) and "/tmp/x.db" in str(err)


def test_file_locked_error_mentions_shared() -> None:
    err = FileLockedError("/tmp/x.db", "held by another process")
    assert err.path == "/tmp/x.db"
    assert "shared=True" in str(err)


def test_session_type_error_is_caught_as_type_error() -> None:
    with pytest.raises(TypeError):
        raise SessionTypeError("int expected")


def test_version_is_a_string() -> None:
    assert isinstance(buntsession.__version__, str)

"""FastAPI integration: take the session as a dependency, `session: SessionDep`.

    from buntsession.fastapi import SessionDep

    @app.get("/count")
    async def count(session: SessionDep) -> int:
        session.put_int("n", session.get_int("n") + 1)
        return session.get_int("n")
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from buntsession.session import Session

__all__ = ["SessionDep", "get_session"]


def get_session(connection: HTTPConnection) -> Session:
    """The session of this request or WebSocket. RuntimeError when SessionMiddleware is not installed."""
    session = connection.scope.get("session")
    if not isinstance(session, Session):
        # A setup error, not a bad argument: RuntimeError, like Starlette's request.session.
        raise RuntimeError("buntsession.SessionMiddleware must be installed to use SessionDep")  # noqa: TRY004
    session.mark_accessed()
    return session


SessionDep = Annotated[Session, Depends(get_session)]

"""The demo site: every user-facing feature of buntsession in a small FastAPI app with server-rendered pages.

Run it from the checkout:  .venv/bin/uvicorn examples.demo.app:app   (then open http://127.0.0.1:8000)

- a visit counter (put_int), a cart kept as an object (put_object), a page showing the session's keys,
  created_at and expires_at;
- a login form that calls login() (a new token, the session bound to the user) and remember_me(), and
  logout by POST (destroy());
- a "your sessions" page: every browser signed in as you (its browser, created, last active), with a
  button to end one and one to end all the others (user_sessions(), end_user_session(),
  end_user_sessions());
- no default credentials: the first login with a new name registers that name with its password
  (kept, scrypt-hashed, in the same data file); every form carries a CSRF token kept in the session.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from buntsession import DB, BuntStore, Session, SessionMiddleware
from buntsession.fastapi import SessionDep

db = DB(os.environ.get("DEMO_DB", "demo.db"))
templates = Jinja2Templates(directory=Path(__file__).with_name("templates"))
app = FastAPI(title="buntsession demo")
app.add_middleware(SessionMiddleware, store=BuntStore(db), secret_key=os.environ.get("DEMO_SECRET"))


def csrf_token(session: Session) -> str:
    """The session's CSRF token, made when a form first needs one."""
    if not session.get_string("csrf"):
        session.put_string("csrf", secrets.token_urlsafe(32))
    return session.get_string("csrf")


def check_csrf(session: Session, token: str) -> None:
    if not hmac.compare_digest(token.encode(), session.get_string("csrf").encode()) or not token:
        raise HTTPException(403, "the form's CSRF token does not match this session")


def password_hash(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)


def page(request: Request, session: Session, name: str, **context: object) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"user": session.get_string("user"),
                                                      "csrf": csrf_token(session), **context})


@app.get("/", response_class=HTMLResponse)
async def home(request: Request, session: SessionDep) -> HTMLResponse:
    session.put_int("visits", session.get_int("visits") + 1)
    return page(request, session, "home.html", visits=session.get_int("visits"),
                cart=session.get_object("cart") or [])


@app.post("/cart")
async def add_to_cart(session: SessionDep, item: str = Form(...), csrf: str = Form("")) -> RedirectResponse:
    check_csrf(session, csrf)
    cart = session.get_object("cart") or []
    cart.append(item[:40])
    session.put_object("cart", cart)
    return RedirectResponse("/", status_code=303)


@app.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, session: SessionDep) -> HTMLResponse:
    return page(request, session, "login.html", error="")


@app.post("/login", response_model=None)
async def login(request: Request, session: SessionDep, username: str = Form(...), password: str = Form(...),
                remember: bool = Form(False), csrf: str = Form("")) -> RedirectResponse | HTMLResponse:
    check_csrf(session, csrf)
    key = f"user:{username}"
    stored = await db.get(key)
    if stored is None:  # a new name: registered with this password (there are no default accounts)
        salt = os.urandom(16)
        await db.set(key, salt + password_hash(password, salt))
    elif not hmac.compare_digest(stored[16:], password_hash(password, stored[:16])):
        return page(request, session, "login.html", error="Wrong password for that name.")
    session.login(username)  # a new token (a token planted before it is worth nothing), bound to the user
    session.put_string("user", username)
    session.put_string("csrf", secrets.token_urlsafe(32))
    session.remember_me(remember)
    return RedirectResponse("/", status_code=303)


@app.post("/logout")
async def logout(session: SessionDep, csrf: str = Form("")) -> RedirectResponse:
    check_csrf(session, csrf)
    session.destroy()
    return RedirectResponse("/", status_code=303)


@app.get("/sessions", response_class=HTMLResponse, response_model=None)
async def your_sessions(request: Request, session: SessionDep) -> HTMLResponse | RedirectResponse:
    if session.user_id is None:
        return RedirectResponse("/login", status_code=303)
    return page(request, session, "sessions.html", sessions=await session.user_sessions(),
                ended=request.query_params.get("ended"))


@app.post("/sessions/end")
async def end_session(session: SessionDep, id: str = Form(...), csrf: str = Form("")) -> RedirectResponse:
    check_csrf(session, csrf)
    ended = await session.end_user_session(id)
    return RedirectResponse("/" if session.user_id is None else f"/sessions?ended={int(ended)}", status_code=303)


@app.post("/sessions/end-others")
async def end_other_sessions(session: SessionDep, csrf: str = Form("")) -> RedirectResponse:
    check_csrf(session, csrf)
    ended = await session.end_user_sessions(keep_current=True)
    return RedirectResponse(f"/sessions?ended={ended}", status_code=303)


@app.get("/session", response_class=HTMLResponse)
async def show_session(request: Request, session: SessionDep) -> HTMLResponse:
    return page(request, session, "session.html", keys=sorted(session.keys()), created_at=session.created_at,
                expires_at=session.expires_at, status=session.status.value)

"""The rating page: a small Starlette app over a :class:`~textenvs.rate.store.RatingStore`, served
by uvicorn.

A rater gives a name once (kept in a cookie), then sees one item at a time: the prompt, one text
with buttons 1-5 or two texts with "Text 1 / Text 2 is better / Equally good", and the reference
behind a "Show the reference" fold. Each answer is a plain form post, recorded before the next item
is shown. Pages are server-rendered with Jinja2's autoescaping, so a generated text is shown as text
(a ``<script>`` in it is printed, not run), and the Content-Security-Policy header allows no script
at all.

Access: the page listens on ``127.0.0.1`` unless told otherwise; on any other address it requires
an access token (made up if none is given), passed once as ``?token=...`` and then kept in a
cookie.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote, unquote

from textenvs.rate.store import (
    MAX_RATER_NAME,
    SCORES,
    RatingStore,
    check_rater,
    shown_swapped,
)

try:
    import jinja2
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, RedirectResponse, Response
    from starlette.routing import Route
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        "The rating page needs the 'rate' extra: pip install 'textenvs[rate]' "
        f"(starlette, uvicorn, jinja2, python-multipart). Missing: {e.name}."
    ) from e

TEMPLATES = Path(__file__).with_name("templates")
TOKEN_COOKIE, RATER_COOKIE = "textenvs_token", "textenvs_rater"
DEFAULT_PORT = 8765
SECURITY_HEADERS = {
    # no script runs on these pages, whatever a generated text holds
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (``localhost``, 127.x, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_token(host: str, token: str | None) -> str | None:
    """The token the page requires: ``token`` if given; on a non-loopback ``host`` a new random
    one if not (a page open to the network is never open to all of it)."""
    if token is not None:
        if not isinstance(token, str) or len(token) < 8:
            raise ValueError("An access token must be a string of at least 8 characters.")
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(18)


def rating_app(
    store: RatingStore,
    token: str | None = None,
    ratings_per_item: int | None = None,
    refresh: int = 5,
    title: str = "textenvs ratings",
) -> Starlette:
    """The rating page's ASGI app.

    Args:
        store: Where the items are and the ratings go.
        token: The access token every request must carry (``?token=`` once, then a cookie); None:
            no token (for a page on 127.0.0.1 only).
        ratings_per_item: Show an item to at most this many raters (None: every rater rates
            every item, which gives the overlap inter-rater agreement needs).
        refresh: Seconds between the "nothing left" page's looks for new items (a
            :class:`~textenvs.rate.human.HumanRating` reward adds them as episodes end).
        title: The page's heading.
    """
    pages = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )

    def page(request: Request, name: str, status: int = 200, **values) -> HTMLResponse:
        values = {
            "title": title,
            "base": request.scope.get("root_path", ""),
            "rater": rater_of(request),
            "progress": None,
            "refresh": None,
            "error": None,
            **values,
        }
        response = HTMLResponse(pages.get_template(name).render(**values), status_code=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def redirect(request: Request, path: str) -> RedirectResponse:
        response = RedirectResponse(request.scope.get("root_path", "") + path, status_code=303)
        response.headers.update(SECURITY_HEADERS)
        return response

    def rater_of(request: Request) -> str | None:
        try:
            return check_rater(unquote(request.cookies.get(RATER_COOKIE, "")))
        except ValueError:
            return None

    async def start_page(request: Request) -> Response:
        if rater_of(request):
            return redirect(request, "/rate")
        return page(request, "start.html", rater=None, max_name=MAX_RATER_NAME)

    async def start(request: Request) -> Response:
        form = await request.form()
        try:
            rater = check_rater(form.get("rater"))
        except ValueError as e:
            return page(request, "start.html", 400, rater=None, max_name=MAX_RATER_NAME, error=e)
        response = redirect(request, "/rate")
        # a header holds Latin-1 only: the name (any script) travels percent-encoded
        response.set_cookie(RATER_COOKIE, quote(rater, safe=""), httponly=True, samesite="strict")
        return response

    def item_page(request: Request, rater: str, error: str | None = None) -> Response:
        item = store.next_item(rater, ratings_per_item)
        progress = store.progress(rater)
        status = 400 if error else 200
        if item is None:
            return page(
                request, "done.html", status, rater=rater, progress=progress, refresh=refresh,
                error=error,
            )  # fmt: skip
        shown = list(zip("ab", item.texts))
        if item.kind == "pair" and shown_swapped(rater, item.id):
            shown.reverse()
        return page(
            request,
            "rate.html",
            status,
            rater=rater,
            progress=progress,
            item=item,
            shown=shown,
            scores=list(SCORES),
            error=error,
        )

    async def rate_page(request: Request) -> Response:
        rater = rater_of(request)
        if rater is None:
            return redirect(request, "/")
        return await run_in_threadpool(item_page, request, rater)

    async def rate(request: Request) -> Response:
        rater = rater_of(request)
        if rater is None:
            return redirect(request, "/")
        form = await request.form()
        try:
            item_id = int(form.get("item", ""))
            score = form.get("score")
            await run_in_threadpool(  # the store checks the answer against the item's kind
                store.record,
                item_id,
                rater,
                None if score is None else int(score),
                form.get("choice"),
            )
        except (ValueError, KeyError) as e:
            return await run_in_threadpool(item_page, request, rater, f"Not recorded: {e}")
        return redirect(request, "/rate")  # a reload of the next page posts nothing twice

    async def logout(request: Request) -> Response:
        response = redirect(request, "/")
        response.delete_cookie(RATER_COOKIE)
        return response

    async def health(request: Request) -> Response:
        return Response("ok", media_type="text/plain")

    async def require_token(request: Request, call_next) -> Response:
        given = request.query_params.get("token")
        if given is not None and hmac.compare_digest(given, token):
            response = redirect(request, request.url.path)  # the token leaves the address bar
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        if not hmac.compare_digest(request.cookies.get(TOKEN_COOKIE, ""), token):
            return page(request, "denied.html", 403, rater=None)
        return await call_next(request)

    routes = [
        Route("/", start_page),
        Route("/start", start, methods=["POST"]),
        Route("/rate", rate_page),
        Route("/rate", rate, methods=["POST"]),
        Route("/logout", logout),
        Route("/health", health),
    ]
    middleware = [Middleware(BaseHTTPMiddleware, dispatch=require_token)] if token else []
    app = Starlette(routes=routes, middleware=middleware)
    return app


def _bound_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port), with a clear error when the
    port is taken."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(
            f"Could not listen on {host}:{port} ({e.strerror}): another rating page or program "
            "uses it. Pass another port (--port), or 0 for any free one."
        ) from e
    sock.listen(128)
    return sock


class RatingServer:
    """A rating page served by uvicorn in a background thread (``with RatingServer(...) as s:``),
    for a reward that waits for ratings and for tests. :func:`serve` serves in the foreground.

    Args:
        store: The ratings database.
        host: The address to listen on.
        port: The port (0: any free one; :attr:`url` says which).
        token: The access token (see :func:`access_token`: made up off loopback if None).
        **app_kwargs: :func:`rating_app`'s other arguments.
    """

    def __init__(
        self,
        store: RatingStore,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        token: str | None = None,
        **app_kwargs,
    ) -> None:
        self.host, self.token = host, access_token(host, token)
        self.app = rating_app(store, token=self.token, **app_kwargs)
        self._socket = _bound_socket(host, port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The address to open, with the token when there is one."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"/?token={self.token}" if self.token else "/"
        return f"http://{host}:{self.port}{query}"

    def start(self) -> RatingServer:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The rating page did not start on {self.host}:{self.port}.")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            self._thread = None
        self._socket.close()

    def __enter__(self) -> RatingServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(
    store: RatingStore,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = None,
    **app_kwargs,
) -> None:
    """Serve the rating page until interrupted (Ctrl-C), printing its address first."""
    server = RatingServer(store, host, port, token, **app_kwargs)
    print(f"Rating page: {server.url}  (ratings go to {store.path}; Ctrl-C stops it)", flush=True)
    try:
        server._server.run(sockets=[server._socket])
    finally:
        server._socket.close()

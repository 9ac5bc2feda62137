"""A loopback TCP forwarder that a test can cut or make hang, to play a failing database."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

_CHUNK = 65536


class TcpProxy:
    """Forward 127.0.0.1:<port> to a target; `cut()`, `hang()` and `restore()` change that.

    - cut: close every forwarded connection and close each new one at once (a database that
      went away: the client sees the connection end);
    - hang: keep every connection open but forward nothing, and accept new connections without
      answering them (a database, or a path to it, that stopped answering: no byte comes back
      and no error either);
    - restore: forward again; connections cut or hung before stay closed.
    """

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5432) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._mode = "forward"
        self._changed = threading.Condition(self._lock)
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    # --- controls ---------------------------------------------------------------------------

    def cut(self) -> None:
        """Close every connection and refuse the service from now on."""
        self._set_mode("cut")
        self._close_all()

    def hang(self) -> None:
        """Stop forwarding in both directions; connections stay open and silent."""
        self._set_mode("hang")

    def restore(self) -> None:
        """Close what was hung or cut, then forward new connections again."""
        self._close_all()
        self._set_mode("forward")

    def close(self) -> None:
        self._closed = True
        self._set_mode("closed")
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        with contextlib.suppress(OSError):
            self._listener.close()
        self._close_all()
        self._acceptor.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- the forwarding ---------------------------------------------------------------------

    def _set_mode(self, mode: str) -> None:
        with self._changed:
            self._mode = mode
            self._changed.notify_all()

    def _close_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._sockets.update(socks)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            mode = self._mode
            if mode in ("cut", "closed"):
                client.close()
                continue
            self._track(client)
            if mode == "hang":
                continue  # held open, never answered; restore() closes it
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self._track(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _wait_forwarding(self) -> bool:
        """Block while hung; True if bytes may flow, False once cut or closed."""
        with self._changed:
            while self._mode == "hang":
                self._changed.wait()
            return self._mode == "forward"

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                if not self._wait_forwarding():
                    break
                data = src.recv(_CHUNK)
                if not data:
                    break
                # Bytes read just before a hang are held back too, as a hung server would.
                if not self._wait_forwarding():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

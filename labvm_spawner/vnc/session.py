"""The desktop session: Xvnc, an XFCE session and the websockify bridge, supervised.

jupyter-server-proxy runs ``python -m labvm_spawner.vnc.session --listen SOCK`` as the
user on the first visit to ``/user/<name>/desktop/``. Every listener is a unix socket
in the user's 0700 runtime directory, so there is no VNC password to make, store or
leak: the socket's owner and mode are the access control, and the only way in from
outside the container is Jupyter's authenticated proxy.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from traitlets import Float, Int, List, Unicode
from traitlets.config import Application

from .paths import runtime_dir, vnc_socket

HERE = Path(__file__).resolve().parent
X11_DIR = Path("/tmp/.X11-unix")
# Never handed to the desktop: the hub tokens of the Jupyter server that started us.
_PRIVATE_PREFIXES = ("JUPYTERHUB_", "JPY_", "JUPYTER_")
_PRIVATE_WORDS = ("TOKEN", "SECRET", "PASSWORD")


class DesktopSession(Application):
    name = "labvm-desktop"
    description = "Run LabVM's browser desktop (Xvnc + XFCE + websockify) on unix sockets."

    listen = Unicode(
        help="Unix socket websockify listens on (the one jupyter-server-proxy connects to).",
    ).tag(config=True)
    geometry = Unicode(
        "1280x800",
        help="Initial screen size; noVNC's resize=remote then follows the browser window.",
    ).tag(config=True)
    depth = Int(24, help="Colour depth of the X screen in bits.").tag(config=True)
    frame_rate = Int(
        60, help="Most framebuffer updates per second Xvnc sends to one client.",
    ).tag(config=True)
    session_command = List(
        Unicode(),
        # --disable-tcp: xfce4-session's session manager (ICE) would listen on a TCP port.
        default_value=["dbus-launch", "--exit-with-session", "xfce4-session", "--disable-tcp"],
        help="The desktop session, run with DISPLAY set; restarted if it ends (log out).",
    ).tag(config=True)
    novnc_dir = Unicode(
        "/opt/labvm/novnc", help="noVNC's static client files (from Debian's novnc package).",
    ).tag(config=True)
    heartbeat = Int(
        25,
        help="Seconds between websocket pings, so that proxies keep an idle desktop open.",
    ).tag(config=True)
    start_timeout = Float(
        30, help="Seconds to wait for Xvnc's sockets before giving up.",
    ).tag(config=True)
    restart_delay = Float(
        3, help="Seconds to wait before restarting a desktop session that ended.",
    ).tag(config=True)

    aliases = {
        "listen": "DesktopSession.listen",
        "geometry": "DesktopSession.geometry",
        "config": "DesktopSession.config_file",
    }
    config_file = Unicode(
        "/etc/labvm/desktop_config.py", help="Optional config file (system-wide settings).",
    ).tag(config=True)

    def initialize(self, argv: list[str] | None = None) -> None:
        super().initialize(argv)
        if self.config_file and Path(self.config_file).is_file():
            self.load_config_file(self.config_file)
            self.update_config(self.cli_config)  # the command line wins
        if not self.listen:
            raise SystemExit("--listen SOCKET is required")
        self._procs: dict[str, subprocess.Popen] = {}
        self._stopping = False

    # ---- the pieces -------------------------------------------------------

    def _display(self) -> int:
        """The first free X display number in this container."""
        for n in range(1, 100):
            if not (X11_DIR / f"X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
                return n
        raise RuntimeError("no free X display number")

    def _web_dir(self, rdir: Path) -> Path:
        """noVNC's files plus our index page, which opens vnc.html with the right options."""
        web = rdir / "web"
        shutil.rmtree(web, ignore_errors=True)
        web.mkdir(mode=0o700)
        for entry in Path(self.novnc_dir).iterdir():
            (web / entry.name).symlink_to(entry)
        shutil.copyfile(HERE / "web" / "index.html", web / "index.html")
        return web

    def _env(self, display: int) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(_PRIVATE_PREFIXES) and not any(w in k for w in _PRIVATE_WORDS)
        }
        env["DISPLAY"] = f":{display}"
        return env

    def _spawn(self, what: str, cmd: list[str], env: dict[str, str]) -> None:
        self.log.info("starting %s: %s", what, " ".join(cmd))
        # Own process group: stopping the desktop ends the whole XFCE tree with it.
        self._procs[what] = subprocess.Popen(cmd, env=env, start_new_session=True,
                                             stdin=subprocess.DEVNULL)

    def _start_xvnc(self, display: int, sock: Path, env: dict[str, str]) -> None:
        sock.unlink(missing_ok=True)
        self._spawn("Xvnc", [
            "Xvnc", f":{display}",
            # RFB on a unix socket only, owner-only: no TCP port, no password.
            "-rfbunixpath", str(sock), "-rfbunixmode", "0600", "-rfbport", "-1",
            "-SecurityTypes", "None",
            # X clients only through the socket in the container's private /tmp.
            "-nolisten", "tcp",
            "-geometry", self.geometry, "-depth", str(self.depth),
            "-FrameRate", str(self.frame_rate),
            # A reload or a second tab joins the same session instead of kicking it.
            "-AlwaysShared", "-DisconnectClients=0",
            "-AcceptSetDesktopSize",
            # The clipboard in both directions (CLIPBOARD; PRIMARY only to the browser).
            "-AcceptCutText", "-SendCutText", "-SendPrimary",
        ], env)
        deadline = time.monotonic() + self.start_timeout
        while not (sock.exists() and (X11_DIR / f"X{display}").exists()):
            if self._procs["Xvnc"].poll() is not None:
                raise RuntimeError("Xvnc exited at start")
            if time.monotonic() > deadline:
                raise RuntimeError("Xvnc did not open its sockets in time")
            time.sleep(0.05)

    def _start_websockify(self, web: Path, vnc: Path, env: dict[str, str]) -> None:
        Path(self.listen).unlink(missing_ok=True)
        self._spawn("websockify", [
            sys.executable, "-m", "websockify",
            "--web", str(web), "--file-only",
            "--unix-listen", self.listen, "--unix-listen-mode", "600",
            "--unix-target", str(vnc),
            "--heartbeat", str(self.heartbeat),
        ], env)

    # ---- supervision ------------------------------------------------------

    def _stop(self, *_: object) -> None:
        self._stopping = True

    def _end_all(self) -> None:
        for proc in reversed(list(self._procs.values())):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self._procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def start(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        rdir = runtime_dir()
        vnc = vnc_socket()
        display = self._display()
        env = self._env(display)
        try:
            self._start_xvnc(display, vnc, env)
            self._spawn("session", list(self.session_command), env)
            self._start_websockify(self._web_dir(rdir), vnc, env)
            self._supervise(env)
        finally:
            self._end_all()

    def _supervise(self, env: dict[str, str]) -> None:
        while not self._stopping:
            time.sleep(0.5)
            for what in ("Xvnc", "websockify"):
                code = self._procs[what].poll()
                if code is not None:
                    raise SystemExit(f"{what} exited ({code}); ending the desktop")
            if self._procs["session"].poll() is not None:
                # The user logged out of XFCE: give them a fresh session on the same screen.
                self.log.info("desktop session ended; restarting it")
                time.sleep(self.restart_delay)
                self._spawn("session", list(self.session_command), env)


def main(argv: list[str] | None = None) -> None:
    app = DesktopSession.instance()
    app.initialize(argv)
    app.start()


if __name__ == "__main__":
    main()

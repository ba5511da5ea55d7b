"""`mlx-distill run RECIPE --hosts FILE`: start one rank per host with `mlx.launch`, honestly.

The hostfile is the one `mlx.launch --hostfile` takes (what `mlx.distributed_config` writes): a
JSON list of hosts, or {"backend": ..., "envs": [...], "hosts": [...]}, each host
{"ssh": name, "ips": [IP, ...]} (ring needs IPs; "rdma" lists for JACCL). A host whose "ssh" is
127.0.0.1 (or localhost, rewritten to it) runs as a local process, so a localhost hostfile runs
every rank on this machine.

`mlx.launch` cannot be trusted with the outcome: in mlx 0.32.4 it exits 0 when a rank fails, and
it no longer puts `python` in front of the command. So every rank is started as
`<this python> -m mlx_distill ...` after `--`, and each rank prints its own exit code as its last
stderr line (`[mlx-distill] rank R exit C`, when MLX_DISTILL_LAUNCHED is set). The command
succeeds only when every rank reported 0; a rank that reported nothing (killed) fails it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from mlx_distill.errors import BadInput
from mlx_distill.train.launched import EXIT_LINE, LAUNCHED_ENV

PORT_ENV = "MLX_DISTILL_PORT"  # first ring port for remote hosts (default: mlx.launch's 32323)
FORWARD_ENV = ("OPENBLAS_NUM_THREADS", "MLX_DISTILL_TIMEOUT", "MLX_DISTILL_BLAS")
# mlx.launch's own per-rank lines ("[WARN] Node with rank 1 exited with code 2"): replaced by ours
LAUNCHER_LINE = re.compile(r"\[WARN\] Node with rank \d+ (exited with code|was killed)")
LOCAL = "127.0.0.1"


def read_hostfile(path: str | Path) -> dict:
    """The hostfile as {"backend", "envs", "hosts"}; BadInput (one line) when it is missing or
    malformed. "localhost" hosts become 127.0.0.1 (mlx.launch runs those without ssh)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--hosts {path}: hostfile not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BadInput(f"--hosts {path}: not a JSON hostfile ({e})") from None
    if isinstance(data, list):
        data = {"hosts": data}
    if not isinstance(data, dict) or not isinstance(data.get("hosts"), list):
        raise BadInput(f"--hosts {path}: expected a list of hosts or an object with 'hosts'")
    backend = data.get("backend") or "ring"
    envs = data.get("envs", [])
    if not isinstance(envs, list) or not all(isinstance(e, str) and "=" in e for e in envs):
        raise BadInput(f"--hosts {path}: 'envs' must be a list of KEY=VALUE strings")
    hosts = []
    for i, host in enumerate(data["hosts"]):
        where = f"--hosts {path}: host {i}"
        if not isinstance(host, dict) or not isinstance(host.get("ssh"), str) or not host["ssh"]:
            raise BadInput(f'{where}: expected {{"ssh": NAME, "ips": [IP, ...]}}')
        ips = host.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise BadInput(f"{where}: 'ips' must be a list of IP addresses")
        ips = [LOCAL if ip == "localhost" else ip for ip in ips]
        for ip in ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise BadInput(f"{where}: {ip!r} is not an IP address (ring needs IPs)") from None
        if backend == "ring" and not ips:
            raise BadInput(f"{where}: the ring backend needs its 'ips' (Thunderbolt bridge IPs)")
        ssh = LOCAL if host["ssh"] == "localhost" else host["ssh"]
        hosts.append(dict(host, ssh=ssh, ips=ips))
    if len(hosts) < 2:
        raise BadInput(
            f"--hosts {path}: {len(hosts)} host(s); a distributed run needs at least 2 "
            "(run without --hosts for one process)"
        )
    return {"backend": backend, "envs": envs, "hosts": hosts}


def _free_ports(count: int) -> int:
    """A first port with `count` consecutive free ports on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((LOCAL, 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + count):
                t = socket.socket()
                socks.append(t)
                t.bind((LOCAL, p))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError(f"no {count} consecutive free ports on {LOCAL}")


def _launcher() -> list[str]:
    script = Path(sys.executable).parent / "mlx.launch"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]


def launch_command(hostfile: Path, spec: dict, argv: list[str]) -> list[str]:
    """The mlx.launch command line that runs `mlx-distill ARGV` on every host of `spec`."""
    local = all(h["ssh"] == LOCAL for h in spec["hosts"])
    ports = sum(len(h["ips"]) for h in spec["hosts"])
    port = _free_ports(ports) if local else int(os.environ.get(PORT_ENV, 32323))
    cmd = [*_launcher(), "--hostfile", str(hostfile), "--backend", spec["backend"]]
    cmd += ["--starting-port", str(port), "--env", f"{LAUNCHED_ENV}=1"]
    for key in FORWARD_ENV:  # local ranks inherit them; remote ones get them here
        if key in os.environ:
            cmd += ["--env", f"{key}={os.environ[key]}"]
    # The interpreter goes after `--`: mlx.launch no longer prepends python.
    return cmd + ["--", sys.executable, "-m", "mlx_distill", *argv]


def outcome(reported: dict[int, int], world: int, launcher_code: int) -> tuple[int, str | None]:
    """(exit code, one-line message or None) from each rank's reported exit code.

    0 only when all `world` ranks reported 0. When every rank failed with the same code 2 or 3
    (an error every rank agreed on, printed once by rank 0) that code, without a message.
    Otherwise 1, naming each rank that failed or reported nothing (killed)."""
    if not reported and launcher_code != 0:
        return launcher_code, None  # mlx.launch refused its arguments (its message is above)
    missing = [r for r in range(world) if r not in reported]
    failed = {r: c for r, c in sorted(reported.items()) if c != 0}
    if not missing and not failed:
        return 0, None
    codes = set(failed.values())
    if not missing and len(failed) == world and codes in ({2}, {3}):
        return codes.pop(), None
    parts = [f"rank {r} exited with code {c}" for r, c in failed.items()]
    parts += [f"rank {r} exited without reporting its code (killed?)" for r in missing]
    return 1, f"error: distributed run failed: {'; '.join(parts)}"


class _StderrPump:
    """Copies the launcher's stderr to ours as it comes, keeping each rank's exit line (and
    dropping mlx.launch's per-rank WARN lines, which `outcome` replaces)."""

    def __init__(self, stream):
        self.stream, self.reported = stream, {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _emit(self, segment: bytes) -> None:
        text = segment.decode(errors="replace")
        found = EXIT_LINE.match(text.strip())
        if found:
            self.reported[int(found.group(1))] = int(found.group(2))
            return
        if LAUNCHER_LINE.search(text):
            return
        sys.stderr.buffer.write(segment)
        sys.stderr.buffer.flush()

    def _run(self) -> None:
        pending = b""
        while chunk := os.read(self.stream.fileno(), 65536):
            pending += chunk
            # Whole lines (and progress-bar redraws ending in \r) go out at once.
            while ends := [i for i in (pending.find(b"\n"), pending.find(b"\r")) if i >= 0]:
                cut = min(ends)
                self._emit(pending[: cut + 1])
                pending = pending[cut + 1 :]
        if pending:
            self._emit(pending)

    def join(self) -> dict[int, int]:
        self.thread.join()
        return self.reported


def launch(hosts_path: str, argv: list[str]) -> int:
    """Run `mlx-distill ARGV` on every host of the hostfile; the exit code (see `outcome`)."""
    spec = read_hostfile(hosts_path)
    with tempfile.TemporaryDirectory(prefix="mlx-distill-hosts-") as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps(spec))
        cmd = launch_command(hostfile, spec, argv)
        # Its own process group: an interrupt here stops the launcher and its local ranks. The
        # stdin pipe stays open and empty (mlx.launch polls stdin; /dev/null would spin it).
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        pump = _StderrPump(proc.stderr)
        try:
            launcher_code = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        finally:
            proc.stdin.close()
        reported = pump.join()
    code, message = outcome(reported, len(spec["hosts"]), launcher_code)
    if message:
        print(message, file=sys.stderr, flush=True)
    return code

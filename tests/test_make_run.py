"""`make run` as a newcomer uses it: while LiteLLM's proxy (or anything) holds the usual
ports, `make run PORT=...` comes up, says where everything is, serves the quick start it
prints, listens on 127.0.0.1 only, and Ctrl-C stops it all without a word that reads like
a failure. PORT=0 lets Envoy choose (the test reads the port from what make run prints)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness import http

REPO = Path(__file__).resolve().parent.parent
# What the stack listened on before: LiteLLM's 4000, the admin API, the fake upstream,
# Redis, the Check port, metrics, Envoy's admin.
USUAL_PORTS = (4000, 4001, 8081, 6380, 9000, 9464, 9901)
UP = re.compile(r"extauthz is up on (http://127\.0\.0\.1:(\d+))")
PRINTED_COMMAND = ("  KEY=", "  TOKEN=", "  curl ")
FAILURE_WORDS = ("error", "traceback", "exited", "failed", "***", "did not come up", "killed")


@pytest.fixture
def usual_ports_taken() -> Iterator[list[socket.socket]]:
    """The usual ports held (those something else holds already are taken anyway)."""
    held = []
    for port in USUAL_PORTS:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            held.append(s)
        except OSError:
            s.close()
    yield held
    for s in held:
        s.close()


class MakeRun:
    def __init__(self, run_dir: Path, *args: str, target: str = "run", env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(["make", "-s", target, *args], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     env={**os.environ, "EXTAUTHZ_RUN_DIR": str(run_dir), **(env or {})})
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_up(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = UP.search(self.output)
            if found and "Ctrl-C stops everything" in self.output:
                return found.group(1)
            assert self.proc.poll() is None, f"make run exited ({self.proc.returncode}):\n{self.output}"
            time.sleep(0.1)
        raise AssertionError(f"make run not up in {timeout} s:\n{self.output}")

    def ctrl_c(self) -> int:
        """The terminal's Ctrl-C: SIGINT to the foreground process group (make and the script)."""
        os.killpg(self.proc.pid, signal.SIGINT)
        code = self.proc.wait(30)
        self.reader.join(5)
        return code

    def kill(self) -> None:
        """Stopped as a user would (Ctrl-C), else killed: what it started dies with it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def shown(output: str, name: str) -> str:
    found = re.search(rf"^  {re.escape(name)}\s+(\S+)", output, re.M)
    assert found, f"make run does not show {name}:\n{output}"
    return found.group(1)


def test_make_run_comes_up_beside_the_usual_ports_serves_its_quick_start_and_stops_quietly(
        tmp_path: Path, usual_ports_taken: list[socket.socket]) -> None:
    run = MakeRun(tmp_path, "PORT=0")
    try:
        gateway = run.wait_up()
        out = run.output
        port = int(UP.search(out).group(2))  # type: ignore[union-attr]
        assert port not in USUAL_PORTS
        # The listener is on loopback only.
        envoy_admin = shown(out, "Envoy admin")
        listeners = http("GET", f"{envoy_admin}/listeners?format=json").json()["listener_statuses"]
        (ingress,) = [lst for lst in listeners if lst["name"] == "ingress"]
        assert ingress["local_address"]["socket_address"]["address"] == "127.0.0.1"
        for name in ("admin API", "metrics", "fake upstream"):
            assert not any(f":{p}" in shown(out, name) for p in USUAL_PORTS), out
        # The commands it prints work copy-pasted.
        commands = [line.strip() for line in run.lines if line.startswith(PRINTED_COMMAND)]
        assert len(commands) == 2, out
        tried = subprocess.run(["bash", "-ec", "\n".join(commands)], capture_output=True, text=True, timeout=30)
        assert tried.returncode == 0, tried.stderr
        assert "fake upstream: POST /v1/chat/completions model=gpt-4" in tried.stdout, tried.stdout
        ready = (tmp_path / "extauthz.ready.json").read_text()
        sidecar_pid = int(re.search(r'"pid": (\d+)', ready).group(1))  # type: ignore[union-attr]

        before = len(run.lines)
        code = run.ctrl_c()
        said = "\n".join(run.lines[before:])
        assert code in (0, -signal.SIGINT), said   # (make itself ends by the signal, silently)
        assert "Stopped." in said
        assert not [w for w in FAILURE_WORDS if w in said.lower()], said
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        with pytest.raises(ProcessLookupError):
            os.kill(sidecar_pid, 0)
        assert gateway.endswith(f":{port}")
    finally:
        run.kill()


def test_make_run_keeps_what_it_writes_to_its_user_and_prints_no_secret(tmp_path: Path) -> None:
    # A config whose master key comes from the environment: make run names the variable,
    # never its value; its copy of the config (credentials in it) is the user's alone.
    config = tmp_path / "mine.yaml"
    config.write_text((REPO / "examples" / "config.yaml").read_text().replace(
        "master_key: sk-1234", "master_key: os.environ/DEMO_MASTER_KEY"))
    run_dir = tmp_path / "run"
    run = MakeRun(run_dir, "PORT=0", f"CONFIG={config}", env={"DEMO_MASTER_KEY": "sk-never-printed-42"})
    try:
        gateway = run.wait_up()
        assert "sk-never-printed-42" not in run.output
        assert shown(run.output, "master key") == "$DEMO_MASTER_KEY"
        assert http("POST", f"{gateway}/key/generate", {"models": ["gpt-4"]},
                    {"Authorization": "Bearer sk-never-printed-42"}).status == 200
        assert run_dir.stat().st_mode & 0o777 == 0o700
        assert (run_dir / "config.yaml").stat().st_mode & 0o077 == 0
        run.ctrl_c()
        assert "sk-never-printed-42" not in run.output
    finally:
        run.kill()


def test_nothing_make_run_started_outlives_it_when_it_is_killed(tmp_path: Path) -> None:
    # SIGKILL leaves the script no time to stop anything: its processes go with it.
    run = MakeRun(tmp_path, "PORT=0")
    try:
        run.wait_up()
        sidecar = json.loads((tmp_path / "extauthz.ready.json").read_text())["pid"]

        def children_of(pid: int) -> list[int]:
            found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
            return [int(p) for p in found.split()]
        (script,) = children_of(run.proc.pid)  # (make runs the script itself, no shell between)
        children = children_of(script)
        assert sidecar in children and len(children) == 4   # redis, upstream, sidecar, Envoy
        os.kill(script, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while any(alive(p) for p in children):
            assert time.monotonic() < deadline, f"still running: {[p for p in children if alive(p)]}"
            time.sleep(0.1)
    finally:
        run.kill()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[-1][:1] if Path(f"/proc/{pid}/stat").exists() \
        else "X"
    return state != "Z"  # (a zombie is gone, only not yet reaped)


def test_make_run_on_a_taken_port_says_which_and_what_to_do(
        tmp_path: Path, usual_ports_taken: list[socket.socket]) -> None:
    taken = usual_ports_taken[0].getsockname()[1] if usual_ports_taken else 4000
    run = MakeRun(tmp_path, f"PORT={taken}")
    try:
        code = run.proc.wait(60)
        run.reader.join(5)
        assert code != 0
        assert f"127.0.0.1:{taken} is taken" in run.output and "make run PORT=" in run.output, run.output
        assert not (tmp_path / "extauthz.ready.json").exists()  # nothing was started
    finally:
        run.kill()


def test_make_run_jwt_verifies_the_local_identity_providers_tokens_in_envoy(tmp_path: Path) -> None:
    # The recipe of docs/identity-and-jwt.md: the printed commands make a team, get a
    # token for it from the local identity provider and call a model with it; Envoy
    # verifies the RS256 signature (a token changed by one byte is refused).
    run = MakeRun(tmp_path, "PORT=0", target="run-jwt")
    try:
        gateway = run.wait_up()
        commands = [line.strip() for line in run.lines if line.startswith(PRINTED_COMMAND)]
        assert [c.split()[0] for c in commands] == ["curl", "TOKEN=$(curl", "curl"], run.output
        script = "\n".join(commands[:2]) + "\necho; echo \"$TOKEN\""
        tried = subprocess.run(["bash", "-ec", script], capture_output=True, text=True, timeout=30)
        assert tried.returncode == 0, tried.stderr
        token = tried.stdout.strip().splitlines()[-1]
        assert token.count(".") == 2

        def chat(bearer: str, model: str) -> tuple[int, dict]:
            r = http("POST", f"{gateway}/v1/chat/completions", {"model": model, "messages": []},
                     {"Authorization": f"Bearer {bearer}"})
            return r.status, r.json()
        status, body = chat(token, "gpt-4")
        assert status == 200 and body["choices"][0]["message"]["content"].startswith("fake upstream: POST"), body
        assert chat(token, "gpt-4o")[1]["error"]["code"] == "model_not_allowed"
        header, payload, signature = token.split(".")
        flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
        assert chat(f"{header}.{payload}.{flipped}", "gpt-4")[1]["error"]["code"] == "invalid_jwt"
        assert run.ctrl_c() in (0, -signal.SIGINT)
    finally:
        run.kill()


def fenced_blocks(markdown: str, heading: str) -> list[str]:
    """The ```sh blocks of the section under ``heading`` (to the next heading of its level)."""
    level = heading.split()[0]
    section = markdown.split(f"\n{heading}\n", 1)[1]
    section = re.split(rf"\n{level} ", section, maxsplit=1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def run_copied(block: str, gateway: str) -> subprocess.CompletedProcess:
    """A documented block pasted into bash, as the reader would (its make run on another port)."""
    script = "set -eo pipefail\n" + block.replace("localhost:4000", gateway.removeprefix("http://"))
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_the_readme_quick_start_works_copy_pasted(tmp_path: Path) -> None:
    (block,) = fenced_blocks((REPO / "README.md").read_text(), "## Quick start")
    assert "make run" not in block.replace("`make run`", "")  # (the stack is already up)
    run = MakeRun(tmp_path, "PORT=0")
    try:
        done = run_copied(block, run.wait_up())
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert "fake upstream: POST /v1/chat/completions model=gpt-4 credential=Bearer sk-upstream-gpt-4" in out
        assert out.count('"code":"model_not_allowed"') >= 3, out           # gpt-4o, the team's gpt-4, o1-mini
        assert '"code":"budget_exceeded"' in out
        assert '"decision": "deny"' in out and '"code": "model_not_allowed"' in out   # explain
        assert "fake upstream: POST /v1/chat/completions model=gpt-4o-mini" in out   # through openai/*
    finally:
        run.kill()


def test_the_local_jwt_recipe_works_copy_pasted(tmp_path: Path) -> None:
    blocks = fenced_blocks((REPO / "docs" / "identity-and-jwt.md").read_text(), "## Try JWTs locally")
    (recipe,) = [b for b in blocks if "TOKEN=" in b]
    run = MakeRun(tmp_path, "PORT=0", target="run-jwt")
    try:
        gateway = run.wait_up()
        done = run_copied(recipe.replace("$(cat .run/idp.url)", f"$(cat {tmp_path}/idp.url)"), gateway)
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert "fake upstream: POST /v1/chat/completions model=gpt-4" in out
        assert '{"id": "gpt-4", "object": "model"' in out and '"code": "model_not_allowed"' in out
        assert '"team_id": "ml"' in out.split('"code": "model_not_allowed"')[1]   # the admin token's /team/list
    finally:
        run.kill()

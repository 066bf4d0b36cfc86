"""``meshnode demo``: the control plane at work on three local agents, in ~40 s.

It starts real ``meshnode agent`` processes on 127.0.0.1 (free ports, data dirs in a
temp dir) and a tiny HTTP "web" service inside this process, then, watching everything
through the agents' own HTTP API:

1. starts the agents (agent2 and agent3 join agent1; the first three are servers that
   elect a CA leader) and prints the members agent3 sees;
2. registers ``web`` at agent1 with an HTTP health check; agent3's catalog lists it and
   ``/v1/health/service/web?passing`` returns it;
3. makes ``web`` answer 500: agent3 sees it critical; then healthy again;
4. identity and policy: agent1 holds a SPIFFE certificate for ``web`` signed by the
   leader's CA; an intention ``web → db: allow`` written at agent2 is in force at agent3
   (the default policy is deny);
5. the proxy: a ``client`` service registered at agent3 declares ``web`` as an upstream
   on a loopback port; ``web`` is made an ``http`` service; with an intention ``client →
   web: allow`` a request to that port crosses agent3's proxy worker, mutual TLS,
   agent1's worker and reaches ``web``; with ``deny`` the next request on the same
   connection gets a 403 that names the intention;
6. ``kill -9`` agent1: agent3 marks it failed, and ``web`` critical through serfHealth;
7. restarts agent1 with no join address: it rejoins from its saved members, serves its
   registration from disk, and ``web`` is passing again;
8. SIGTERMs agent2: agent3 sees it *left*, not failed;
9. prints the timings and stops everything (exit 0; 1 if a step did not happen).

With ``--forever`` it brings agent2 back, prints the addresses, and keeps the cluster up
until Ctrl-C. Every child process is stopped and reaped, and the temp dir removed, on
any exit (Ctrl-C and SIGTERM included).

The process helpers live in ``meshnode.procs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
from aiohttp import web

from meshnode.client import SERF_STATUS, print_table
from meshnode.procs import (
    AgentProcess,
    fetch_json,
    free_port,
    kill_agents,
    start_agent,
    stop_agent,
    wait_agent_ready,
)

T = TypeVar("T")

#: Agents in the demo (``--members``); the scenario needs three roles.
DEFAULT_AGENTS: Final = 3
MIN_AGENTS: Final = 3
MAX_AGENTS: Final = 9
INTENTION_PATH: Final = "/v1/connect/intentions/exact?source=web&destination=db"
CHECK_PATH: Final = "/v1/connect/intentions/check?source=web&destination=db"
#: Agents that are servers (CA-eligible): the first three.
SERVERS: Final = 3
#: Seconds to let the viewer read each step's outcome before the next one.
PAUSE: Final = 4.5
#: How often the demo polls the agents; it bounds the timing resolution.
POLL: Final = 0.1
SERVICE: Final = "web"
#: Calls ``web`` through the proxies (step 5).
CLIENT: Final = "client"
PROXY_INTENTION_PATH: Final = "/v1/connect/intentions/exact?source=client&destination=web"
SERVICE_ID: Final = "web-1"
CHECK_ID: Final = f"service:{SERVICE_ID}"
INDENT: Final = " " * 10


class StepFailed(Exception):
    """A step did not happen in time; the message says which."""


@dataclass(frozen=True, slots=True)
class Instance:
    """One row of ``/v1/health/service/web`` as an agent reports it."""

    node: str
    service: str
    address: str
    status: str
    checks: tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------- web


class WebService:
    """The demo's "web" service: answers 200, or 500 while ``failing``.
    ``POST /fail`` and ``POST /recover`` flip it (for ``--forever`` users)."""

    def __init__(self) -> None:
        self.failing = False
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        if request.method == "POST" and request.path in ("/fail", "/recover"):
            self.failing = request.path == "/fail"
        if self.failing:
            return web.Response(status=500, text="web: failing on purpose\n")
        return web.Response(text="hello from web\n")

    async def start(self) -> None:
        """Serve on 127.0.0.1 on a free port (``port``), in the running loop."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = next(
            int(address[1]) for address in self._runner.addresses if isinstance(address, tuple)
        )

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


# --------------------------------------------------------------------------- views


def member_statuses(reply: object) -> dict[str, str] | None:
    """``/v1/agent/members`` as name → status word (as ``meshnode members`` shows it)."""
    if not isinstance(reply, list):
        return None
    return {str(m["Name"]): member_status(m) for m in reply}


def member_status(entry: Mapping[str, Any]) -> str:
    return str(entry.get("State") or SERF_STATUS.get(entry.get("Status", 0), "unknown"))


def members_rows(reply: object) -> list[list[object]]:
    """``meshnode members``'s table."""
    rows: list[list[object]] = [["Node", "Address", "Status"]]
    for m in reply if isinstance(reply, list) else []:
        rows.append([m["Name"], f"{m['Addr']}:{m['Port']}", member_status(m)])
    return rows


def instances(reply: object) -> list[Instance] | None:
    """``/v1/health/service/:name`` as rows; the status is the worst check's."""
    if not isinstance(reply, list):
        return None
    rows = []
    for entry in reply:
        service = entry["Service"]
        checks = tuple((str(c["CheckID"]), str(c["Status"])) for c in entry["Checks"])
        statuses = {status for _, status in checks}
        worst = next((s for s in ("critical", "warning") if s in statuses), "passing")
        address = service.get("Address") or entry["Node"].get("Address", "")
        rows.append(
            Instance(
                str(entry["Node"]["Node"]),
                str(service["Service"]),
                f"{address}:{service['Port']}",
                worst,
                checks,
            )
        )
    return rows


def instance_rows(found: Sequence[Instance]) -> list[list[object]]:
    rows: list[list[object]] = [["Node", "Service", "Address", "Status", "Checks"]]
    for i in found:
        checks = " ".join(f"{check}={status}" for check, status in i.checks)
        rows.append([i.node, i.service, i.address, i.status, checks])
    return rows


def table(rows: Sequence[Sequence[object]]) -> str:
    """``meshnode members``'s table style, indented under the timestamped lines."""
    out = io.StringIO()
    print_table(rows, out)
    return "\n".join(INDENT + line for line in out.getvalue().splitlines())


def web_status(found: Sequence[Instance] | None, node: str) -> str:
    """Status of ``node``'s web instance, or "absent" / "no answer"."""
    if found is None:
        return "no answer"
    return next((i.status for i in found if i.node == node), "absent")


# --------------------------------------------------------------------------- the demo


class Demo:
    """The scripted scenario; ``run`` returns the exit code."""

    def __init__(self, workdir: Path, size: int, forever: bool) -> None:
        self.workdir = workdir
        self.size = size
        self.forever = forever
        self.agents = [AgentProcess.create(f"agent{i + 1}", workdir) for i in range(size)]
        self.first, self.leaver, self.observer = self.agents[0], self.agents[1], self.agents[2]
        #: Every process ever started, restarts included: all are reaped on exit.
        self.children: list[asyncio.subprocess.Process] = []
        self.web = WebService()
        self.started = time.monotonic()
        self.timings: list[tuple[str, float]] = []
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ output

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:5.1f}s] {text}", flush=True)

    def step(self, number: int, text: str) -> None:
        print(flush=True)
        self.say(f"── {number}. {text}")

    def show(self, text: str) -> None:
        print(text, flush=True)

    async def pause(self, seconds: float | None = None) -> None:
        """Time to read; the mesh keeps running meanwhile."""
        await asyncio.sleep(PAUSE if seconds is None else seconds)

    # ------------------------------------------------------------------ HTTP

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    async def get(self, agent: AgentProcess, path: str) -> Any:
        return await fetch_json(self.session, agent.http_url + path)

    async def put(self, agent: AgentProcess, path: str, body: object) -> None:
        try:
            async with self.session.put(agent.http_url + path, json=body) as response:
                if response.status != 200:
                    detail = (await response.text()).strip()
                    raise StepFailed(f"PUT {path} at {agent.name}: {response.status} {detail}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise StepFailed(f"PUT {path} at {agent.name}: {exc!r}") from None

    async def members_of(self, agent: AgentProcess) -> dict[str, str] | None:
        return member_statuses(await self.get(agent, "/v1/agent/members"))

    async def web_of(self, agent: AgentProcess, *, passing: bool = False) -> list[Instance] | None:
        query = "?passing" if passing else ""
        return instances(await self.get(agent, f"/v1/health/service/{SERVICE}{query}"))

    async def show_members(self, agent: AgentProcess) -> None:
        self.show(table(members_rows(await self.get(agent, "/v1/agent/members"))))

    async def show_web(self, agent: AgentProcess, *, passing: bool = False) -> None:
        self.show(table(instance_rows(await self.web_of(agent, passing=passing) or [])))

    # ------------------------------------------------------------------ waiting

    async def until(
        self,
        what: str,
        probe: Callable[[], Awaitable[T]],
        done: Callable[[T], bool],
        *,
        within: float,
        since: float | None = None,
        label: str = "",
        describe: Callable[[T], str] | None = None,
        marks: Mapping[str, Callable[[T], bool]] | None = None,
    ) -> float:
        """Poll ``probe`` until ``done``; returns the seconds since ``since`` (default:
        now), recorded for the summary under ``label`` if given. ``describe`` lines are
        printed when they change; each of ``marks`` (label → condition) records the
        time its condition first held. Raises StepFailed after ``within`` seconds."""
        start = time.monotonic() if since is None else since
        deadline = time.monotonic() + within
        last = ""
        pending = dict(marks or {})
        while True:
            value = await probe()
            elapsed = time.monotonic() - start
            if describe is not None and (text := describe(value)) != last:
                self.say(f"  {text}  (+{elapsed:.1f} s)")
                last = text
            for name, reached in list(pending.items()):
                if reached(value):
                    self.timings.append((name, elapsed))
                    del pending[name]
            if done(value):
                self.say(f"✓ {what} ({elapsed:.1f} s)")
                if label:
                    self.timings.append((label, elapsed))
                return elapsed
            if time.monotonic() > deadline:
                raise StepFailed(f"{what}: not within {within:.0f} s")
            await asyncio.sleep(POLL)

    def all_see_alive(self, views: Sequence[dict[str, str] | None]) -> bool:
        names = {a.name for a in self.agents if a.running}
        return all(
            view is not None and all(view.get(n) == "alive" for n in names) for view in views
        )

    async def running_views(self) -> list[dict[str, str] | None]:
        return list(await asyncio.gather(*(self.members_of(a) for a in self.agents if a.running)))

    # ------------------------------------------------------------------ processes

    async def start(self, agent: AgentProcess, join: Sequence[str] = ()) -> None:
        servers = self.agents[:SERVERS]
        extra = ["--server", "--bootstrap-expect", str(SERVERS)] if agent in servers else []
        await start_agent(agent, join, extra)
        assert agent.process is not None
        self.children.append(agent.process)

    async def wait_saved_members(self, agent: AgentProcess, within: float = 15) -> None:
        others = {a.name for a in self.agents if a is not agent}
        deadline = time.monotonic() + within
        while not others <= set(self.saved_members(agent)):
            if time.monotonic() > deadline:
                raise StepFailed(f"{agent.name} did not save its members within {within:.0f} s")
            await asyncio.sleep(POLL)

    def saved_members(self, agent: AgentProcess) -> list[str]:
        """Names in the agent's ``members.json`` (what it rejoins after a restart)."""
        try:
            data = json.loads((agent.data_dir / "members.json").read_text())
            return sorted(str(m["name"]) for m in data["members"] if m["name"] != agent.name)
        except (OSError, ValueError, KeyError, TypeError):
            return []

    # ------------------------------------------------------------------ scenario

    async def run(self) -> int:
        timeout = aiohttp.ClientTimeout(total=2, sock_connect=1)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._session = session
            try:
                await self.scenario()
            except StepFailed as exc:
                self.say(f"✗ {exc}")
                for agent in self.agents:
                    tail = agent.log_tail(800).strip()
                    if tail:
                        self.show(f"--- last lines of {agent.log_path.name}:\n{tail}")
                return 1
            if self.forever:
                await self.stay_up()
        await self.stop_all()
        self.say("done: every agent stopped")
        return 0

    async def scenario(self) -> None:
        first, leaver, observer = self.first, self.leaver, self.observer
        others = ", ".join(a.name for a in self.agents[1:])
        self.say(f"meshnode demo: {self.size} agents on 127.0.0.1 (data and logs: {self.workdir})")

        self.step(1, f"start {self.size} agents; {others} join {first.name}")
        for agent in self.agents:
            await self.start(agent, () if agent is first else (first.gossip_addr,))
            self.say(
                f"{agent.name}  pid {agent.pid:<7}  http {agent.http_addr}  "
                f"gossip {agent.gossip_addr}"
            )
        try:
            await asyncio.gather(*(wait_agent_ready(a, self.session) for a in self.agents))
        except RuntimeError as exc:
            raise StepFailed(str(exc)) from None
        await self.until(
            f"every agent sees all {self.size} alive",
            self.running_views,
            self.all_see_alive,
            within=20,
            since=self.started,
            label=f"cluster of {self.size} formed (from the demo's start)",
        )
        self.say(f"members as {observer.name} sees them (meshnode members):")
        await self.show_members(observer)
        await self.pause()

        self.step(2, f"register a '{SERVICE}' service at {first.name}, HTTP check every 1s")
        await self.web.start()
        self.say(f"{SERVICE} listens on {self.web.address} (inside the demo process)")
        registered = time.monotonic()
        await self.put(
            first,
            "/v1/agent/service/register",
            {
                "Name": SERVICE,
                "ID": SERVICE_ID,
                "Address": "127.0.0.1",
                "Port": self.web.port,
                "Tags": ["demo", "v1"],
                "Check": {
                    "Name": f"{SERVICE} HTTP",
                    "HTTP": f"http://{self.web.address}/health",
                    "Interval": "1s",
                    "Timeout": "1s",
                },
            },
        )
        self.say(f"PUT {first.http_addr}/v1/agent/service/register → 200")

        async def catalog() -> Any:
            return await self.get(observer, "/v1/catalog/services")

        await self.until(
            f"{observer.name}'s catalog lists {SERVICE}",
            catalog,
            lambda found: isinstance(found, dict) and SERVICE in found,
            within=10,
            since=registered,
            label=f"register → in {observer.name}'s catalog",
        )
        services = await catalog()
        self.show(table([["Service", "Tags"]] + [[n, ",".join(t)] for n, t in services.items()]))
        await self.until(
            f"{observer.name}: /v1/health/service/{SERVICE}?passing returns it",
            lambda: self.web_of(observer, passing=True),
            lambda found: web_status(found, first.name) == "passing",
            within=15,
            since=registered,
            label=f"register → passing on {observer.name}",
        )
        await self.show_web(observer, passing=True)
        await self.pause()

        def web_on_first(found: list[Instance] | None) -> str:
            status = web_status(found, first.name)
            return f"{observer.name} sees {SERVICE} on {first.name}: {status}"

        self.step(3, f"{SERVICE} starts answering 500")
        self.web.failing = True
        await self.until(
            f"{observer.name} sees {SERVICE} critical",
            lambda: self.web_of(observer),
            lambda found: web_status(found, first.name) == "critical",
            within=15,
            label=f"500 → critical on {observer.name}",
            describe=web_on_first,
        )
        await self.show_web(observer)
        await self.pause(PAUSE / 2)
        self.say(f"{SERVICE} answers 200 again")
        self.web.failing = False
        await self.until(
            f"{observer.name} sees {SERVICE} passing again",
            lambda: self.web_of(observer),
            lambda found: web_status(found, first.name) == "passing",
            within=15,
            label=f"200 → passing on {observer.name}",
            describe=web_on_first,
        )

        await self.pause()

        self.step(4, "identity and policy: a certificate for web, an intention web → db")
        await self.connect_step()
        await self.pause()

        self.step(5, "the proxy: client → web through two proxy workers over mutual TLS")
        await self.proxy_step()
        await self.pause()
        # Step 6 restarts agent1 from what it saved, which it does every few seconds.
        await self.wait_saved_members(first)

        self.step(6, f"kill -9 {first.name} (pid {first.pid}): no goodbye")
        await self.kill_first()
        await self.pause()

        self.step(7, f"restart {first.name} with no --join address")
        self.say(
            f"it rejoins from {first.data_dir.name}/members.json: "
            + ", ".join(self.saved_members(first))
        )
        restarted = time.monotonic()
        await self.start(first)
        self.say(f"{first.name}  pid {first.pid:<7}  http {first.http_addr}  (no --join)")
        try:
            await wait_agent_ready(first, self.session)
        except RuntimeError as exc:
            raise StepFailed(str(exc)) from None
        own = await self.get(first, "/v1/agent/services")
        if not isinstance(own, dict) or SERVICE_ID not in own:
            raise StepFailed(f"{first.name} did not restore {SERVICE_ID} from disk: {own}")
        elapsed = time.monotonic() - restarted
        self.say(f"✓ {first.name} is up, serving {SERVICE_ID} from disk ({elapsed:.1f} s)")
        self.timings.append((f"restart → {first.name} serves {SERVICE_ID} from disk", elapsed))
        await self.rejoin_first(restarted)
        await self.pause()

        self.step(8, f"SIGTERM {leaver.name} (graceful leave)")
        left = time.monotonic()
        leaver.terminate()
        await self.until(
            f"{observer.name} sees {leaver.name} left, not failed",
            lambda: self.members_of(observer),
            lambda view: view is not None and view.get(leaver.name) == "left",
            within=15,
            since=left,
            label=f"SIGTERM → {leaver.name} left on {observer.name}",
            describe=lambda view: (
                f"{observer.name} sees {leaver.name}: {(view or {}).get(leaver.name, '?')}"
            ),
        )
        code = await stop_agent(leaver)
        self.say(f"{leaver.name} exited with code {code}")
        await self.show_members(observer)
        await self.pause(PAUSE / 2)

        self.step(9, "summary")
        self.summary()

    async def connect_step(self) -> None:
        first, leaver, observer = self.first, self.leaver, self.observer
        await self.until(
            f"{observer.name} knows the CA leader",
            lambda: self.get(observer, "/v1/status/leader"),
            lambda found: isinstance(found, str) and bool(found),
            within=20,
        )
        leader_address = await self.get(observer, "/v1/status/leader")
        name = next((a.name for a in self.agents if a.gossip_addr == leader_address), "?")
        self.say(f"leader: {name} ({leader_address})")
        leaf: Any = None

        async def fetch_leaf() -> Any:
            nonlocal leaf
            leaf = await self.get(first, f"/v1/agent/connect/ca/leaf/{SERVICE}")
            return leaf

        await self.until(
            f"{first.name} holds a certificate for {SERVICE}",
            fetch_leaf,
            lambda found: isinstance(found, dict) and "CertPEM" in found,
            within=20,
            label=f"ask {first.name} → {SERVICE}'s certificate",
        )
        self.show(
            table(
                [
                    ["Service", "SPIFFE ID", "Valid before"],
                    [SERVICE, leaf.get("ServiceURI", "?"), leaf.get("ValidBefore", "?")],
                ]
            )
        )
        written = time.monotonic()
        await self.put(
            leaver,
            INTENTION_PATH,
            {"Action": "allow", "Description": "demo"},
        )
        self.say(f"default policy: deny; PUT {leaver.name} {INTENTION_PATH} allow")

        async def check() -> Any:
            return await self.get(observer, CHECK_PATH)

        await self.until(
            f"{observer.name}: web → db is allowed",
            check,
            lambda found: isinstance(found, dict) and found.get("Allowed") is True,
            within=15,
            since=written,
            label=f"intention at {leaver.name} → in force at {observer.name}",
        )

    async def proxy_step(self) -> None:
        first, leaver, observer = self.first, self.leaver, self.observer
        port = free_port()
        await self.put(
            observer,
            "/v1/agent/service/register",
            {
                "Name": CLIENT,
                "Port": free_port(),
                "Connect": {
                    "SidecarService": {
                        "Proxy": {
                            "Upstreams": [{"DestinationName": SERVICE, "LocalBindPort": port}]
                        }
                    }
                },
            },
        )
        self.say(
            f"{CLIENT} registered at {observer.name} with upstream {SERVICE} on 127.0.0.1:{port}"
        )
        # http: the proxies speak HTTP/1.1 to each other and check intentions per request
        # (tcp, the default, checks them per connection and answers nothing itself).
        defaults = {"Kind": "service-defaults", "Name": SERVICE, "Protocol": "http"}
        await self.put(leaver, "/v1/config", defaults)
        self.say(f"PUT {leaver.name} /v1/config service-defaults {SERVICE}: Protocol http")
        await self.put(leaver, PROXY_INTENTION_PATH, {"Action": "allow"})
        self.say(f"PUT {leaver.name} {PROXY_INTENTION_PATH} allow")
        url = f"http://127.0.0.1:{port}/"
        written = time.monotonic()
        await self.until(
            f"GET {url} at {observer.name} reaches {SERVICE} on {first.name}",
            lambda: self.fetch(url),
            lambda found: found[0] == 200,
            within=20,
            since=written,
            label=f"register + intention → {CLIENT} reaches {SERVICE}",
            describe=lambda found: f"{found[0]} {found[1]}".strip(),
        )
        status, body = await self.fetch(url)
        self.show(f"{INDENT}{status} {body}")
        await self.put(leaver, PROXY_INTENTION_PATH, {"Action": "deny"})
        written = time.monotonic()
        self.say(f"PUT {leaver.name} {PROXY_INTENTION_PATH} deny")
        await self.until(
            f"{CLIENT} → {SERVICE} is refused with 403",
            lambda: self.fetch(url),
            lambda found: found[0] == 403,
            within=15,
            since=written,
            label=f"deny at {leaver.name} → 403 at {observer.name}'s proxy",
            describe=lambda found: f"{found[0]} {found[1]}".strip(),
        )
        status, body = await self.fetch(url)
        self.show(f"{INDENT}{status} {body}")

    async def fetch(self, url: str) -> tuple[int, str]:
        """Status and what says why: the body, or the proxy's ``x-meshnode-error``."""
        try:
            async with self.session.get(url) as response:
                text = (await response.text()).strip()
                error = response.headers.get("x-meshnode-error")
                return response.status, f"x-meshnode-error: {error}" if error else text
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, type(exc).__name__

    async def kill_first(self) -> None:
        first, observer = self.first, self.observer
        assert first.process is not None
        killed = time.monotonic()
        first.kill()
        await first.process.wait()

        async def probe() -> tuple[str, str]:
            view, found = await asyncio.gather(self.members_of(observer), self.web_of(observer))
            return (view or {}).get(first.name, "?"), web_status(found, first.name)

        await self.until(
            f"{observer.name} marks {first.name} failed",
            probe,
            lambda seen: seen == ("failed", "critical"),
            within=30,
            since=killed,
            label=f"kill -9 → {first.name} failed on {observer.name}",
            describe=lambda seen: (
                f"{observer.name} sees {first.name}: {seen[0]:<7}  {SERVICE}: {seen[1]}"
            ),
            marks={f"kill -9 → {SERVICE} critical on {observer.name}": _web_critical},
        )
        await self.show_members(observer)
        await self.show_web(observer)

    async def rejoin_first(self, restarted: float) -> None:
        first, observer = self.first, self.observer

        async def probe() -> tuple[str, str]:
            view, found = await asyncio.gather(self.members_of(observer), self.web_of(observer))
            return (view or {}).get(first.name, "?"), web_status(found, first.name)

        await self.until(
            f"{observer.name} sees {first.name} alive and {SERVICE} passing",
            probe,
            lambda seen: seen == ("alive", "passing"),
            within=30,
            since=restarted,
            label=f"restart → {SERVICE} passing on {observer.name}",
            describe=lambda seen: (
                f"{observer.name} sees {first.name}: {seen[0]:<7}  {SERVICE}: {seen[1]}"
            ),
            marks={f"restart → {first.name} alive on {observer.name}": _first_alive},
        )
        await self.show_web(observer, passing=True)

    def summary(self) -> None:
        rows: list[list[object]] = [["What", "Seconds"]]
        rows += [[what, f"{seconds:.1f}"] for what, seconds in self.timings]
        rows.append(["the whole demo", f"{time.monotonic() - self.started:.1f}"])
        self.show(table(rows))

    async def stop_all(self) -> None:
        running = [a for a in self.agents if a.running]
        if running:
            self.say("stopping " + ", ".join(a.name for a in running) + " (graceful leave)")
        await asyncio.gather(*(stop_agent(a) for a in running))

    # ------------------------------------------------------------------ --forever

    async def stay_up(self) -> None:
        leaver = self.leaver
        print(flush=True)
        self.say(f"--forever: restarting {leaver.name} (it rejoins from its saved members)")
        await self.start(leaver)
        with contextlib.suppress(RuntimeError):
            await wait_agent_ready(leaver, self.session)
        command = sys.argv[0] if Path(sys.argv[0]).name == "meshnode" else "meshnode"
        observer = self.observer
        self.say("the cluster stays up until Ctrl-C:")
        rows: list[list[object]] = [["Node", "HTTP", "Gossip", "PID"]]
        rows += [[a.name, a.http_addr, a.gossip_addr, a.pid] for a in self.agents]
        rows.append([SERVICE, self.web.address, "-", "(this process)"])
        self.show(table(rows))
        self.show(
            f"{INDENT}try: {command} members -http-addr {observer.http_addr}\n"
            f"{INDENT}     curl -s '{observer.http_url}/v1/health/service/{SERVICE}?passing'\n"
            f"{INDENT}     curl -X POST http://{self.web.address}/fail   (then /recover)\n"
            f"{INDENT}     kill -9 {self.first.pid}   (then watch below)"
        )
        last: dict[str, str] = {}
        while True:
            watcher = next((a for a in reversed(self.agents) if a.running), None)
            if watcher is None:
                self.say("no agent is running any more")
                return
            view, found = await asyncio.gather(self.members_of(watcher), self.web_of(watcher))
            now: dict[str, str] = dict(view or {})
            for i in found or []:
                now[f"{i.service} on {i.node}"] = i.status
            for key, status in sorted(now.items()):
                if last and last.get(key) != status:
                    self.say(f"{watcher.name} sees {key}: {last.get(key, 'new')} → {status}")
            last = now
            await asyncio.sleep(0.5)


def _web_critical(seen: tuple[str, str]) -> bool:
    return seen[1] == "critical"


def _first_alive(seen: tuple[str, str]) -> bool:
    return seen[0] == "alive"


# --------------------------------------------------------------------------- entry


async def run_demo(
    size: int = DEFAULT_AGENTS, forever: bool = False, workdir: Path | None = None
) -> int:
    """Run the demo; the exit code (143 if stopped by SIGTERM; Ctrl-C propagates as
    cancellation, which ``asyncio.run`` turns into KeyboardInterrupt)."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    terminated: list[bool] = []

    def on_sigterm() -> None:
        terminated.append(True)
        main_task.cancel()

    # SIGTERM to the demo cancels it like Ctrl-C does, so the cleanup below runs.
    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="meshnode-demo-"))
            )
        demo = Demo(workdir, size, forever)
        try:
            return await demo.run()
        except asyncio.CancelledError:
            if not terminated:
                raise
            return 143
        finally:
            # Whatever happened, no child outlives the demo (and the temp dir goes only
            # after they are gone: they hold locks in it). Another SIGTERM meanwhile
            # must not cut this short.
            loop.add_signal_handler(signal.SIGTERM, lambda: None)
            try:
                await kill_agents(demo.children)
                await demo.web.aclose()
            finally:
                loop.remove_signal_handler(signal.SIGTERM)
                if terminated:
                    print("\nterminated; every agent process was stopped", flush=True)


def main(size: int = DEFAULT_AGENTS, forever: bool = False) -> int:
    if not MIN_AGENTS <= size <= MAX_AGENTS:
        print(f"meshnode demo: --members must be {MIN_AGENTS}..{MAX_AGENTS}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_demo(size, forever))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted; every agent process was stopped", flush=True)
        return 130

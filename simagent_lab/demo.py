"""`simagent demo`: the whole story on one machine, in words a newcomer follows.

It starts a local mosquitto, a fake Quectel modem on a real pseudo-terminal and the real
agent (`simagent run`, as a separate process), subscribes to the agent's topics like a
platform would, and walks through: first bind -> a foreign SIM is inserted -> the radio
is blocked before the card can attach -> the right SIM comes back -> the radio is
restored -> the evidence bundle is exported and verified -> the agent stops and the
platform sees it go offline, and ends with what to try next. Every process it started is
stopped again; it exits 0 when the story went as it should and 1 (naming the step) when
it did not.

`simagent run` builds the whole command parser and so imports this module: the lab it
drives (broker, fake modem, agent process) is imported when the demo runs, not here, so
the daemon does not carry it (about 3 MB).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent import exitcodes

if TYPE_CHECKING:
    from simagent_lab.fakemodem_handles import ProcessFakeModem
    from simagent_lab.localagent import AgentProcess

IMEI = "864505040000013"
HOME_ICCID = "89860321234567890123"
FOREIGN_ICCID = "89860098765432109876"
STEP_TIMEOUT_S = 20.0


class DemoFailed(Exception):
    pass


class Platform:
    """An MQTT subscriber to `simagent/#` that narrates what arrives."""

    def __init__(self, port: int, say: Callable[[str], None]) -> None:
        self.say = say
        self.messages: queue.Queue[tuple[str, dict]] = queue.Queue()
        self.seen: list[tuple[str, dict]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-platform")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("simagent/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        try:
            doc = json.loads(message.payload)
        except ValueError:
            doc = {"raw": message.payload.decode(errors="replace")}
        self.messages.put((message.topic, doc))

    def mark(self) -> int:
        """A point in the message history: later waits look only at what came after it."""
        while not self.messages.empty():
            self._take(self.messages.get_nowait())
        return len(self.seen)

    def _take(self, message: tuple[str, dict]) -> None:
        self.seen.append(message)
        self._narrate(*message)

    def wait_for(self, what: str, predicate: Callable[[str, dict], bool], since: int = 0) -> dict:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        for topic, doc in self.seen[since:]:
            if predicate(topic, doc):
                return doc
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DemoFailed(f"the platform never saw {what}")
            try:
                topic, doc = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            self._take((topic, doc))
            if predicate(topic, doc):
                return doc

    def event(self, type_: str, since: int) -> dict:
        return self.wait_for(f"a {type_} event", lambda t, d: t.endswith("/events") and d.get("type") == type_, since)

    def _narrate(self, topic: str, doc: dict) -> None:
        kind = topic.rsplit("/", 1)[-1]
        if kind == "events":
            self.say(f"    platform <- event seq {doc.get('seq')} {doc.get('type')}: {_describe(doc)}")
        elif kind == "status":
            self.say(f"    platform <- status: online={doc.get('online')}")
        elif kind == "state":
            self.say(f"    platform <- state: {_state_words(doc)}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _state_words(doc: dict) -> str:
    """The state document in a line that never contradicts itself: while the gate holds the
    radio off to check the card, the binding shown is the last decision, not a verdict on
    the card in the tray."""
    status = (doc.get("binding") or {}).get("status")
    radio = doc.get("radio") or {}
    level = {1: "on", 4: "off"}.get(radio.get("cfun"), f"CFUN={radio.get('cfun')}")
    if radio.get("gated"):
        if status == "ok":
            return f"radio {level}: held off while the agent checks the card (last decision: ok)"
        return f"binding {status}, radio {level}: held off by the binding gate"
    if status == "ok" and level == "off":
        return "binding ok, radio still off: the agent switches it on now"
    return f"binding {status}, radio {level}"


def _describe(event: dict) -> str:
    data = event.get("data", {})
    keys = ("reason", "iccid", "imei", "observed_iccid", "bound_iccid", "port", "profile", "cfun", "action")
    parts = [f"{k}={data[k]}" for k in keys if data.get(k) not in (None, "", [])]
    return ", ".join(parts) or "-"


class Demo:
    def __init__(self, directory: Path, out=sys.stdout) -> None:
        self.dir = directory
        self.out = out
        self.processes: list[Callable[[], Any]] = []

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, number: int, text: str) -> None:
        self.say()
        self.say(f"[{number}/7] {text}")

    def run(self) -> int:
        try:
            self._story()
        except DemoFailed as exc:
            self.say(f"\nDEMO FAILED: {exc}")
            self._show_agent_log()
            return exitcodes.CHECK_FAILED
        finally:
            for stop in reversed(self.processes):
                stop()
        self.say("\nDemo finished: the foreign card never reached the network, the evidence tells the story.")
        self._what_next()
        return exitcodes.OK

    def _what_next(self) -> None:
        self.say("\nWhat to try next:")
        self.say("  ./dev.sh demo --keep                 keep the working directory: agent log, config, state, evidence")
        self.say("  .venv/bin/simagent-fakemodem --link /tmp/modem --control /tmp/modem.ctl &")
        self.say("  .venv/bin/simagent status --port /tmp/modem      what a technician sees (also: diag, at AT+CSQ)")
        self.say("  .venv/bin/simagent-fakemodem ctl --control /tmp/modem.ctl sim-remove    change the fake, look again")
        self.say("  README.md: 'Fake modem', 'The daemon and the CLI', 'MQTT reporting' explain each part")

    def _story(self) -> None:
        from simagent_lab.fakemodem_handles import ProcessFakeModem
        from simagent_lab.localbroker import Broker

        self.say("simagent demo: a terminal with a cellular modem and its own IoT SIM, an MQTT platform,")
        self.say("and the agent in between - all on this machine, nothing real is touched.")

        self.step(1, "Starting a local MQTT broker (the platform side)")
        broker = Broker(self.dir / "broker").start()
        self.processes.append(broker.stop)
        self.say(f"    mosquitto listening on 127.0.0.1:{broker.port}")

        self.step(2, "Starting a fake Quectel modem on a real pseudo-terminal")
        modem = ProcessFakeModem(self.dir, "ttyFAKE", profile="quectel", imei=IMEI, iccid=HOME_ICCID)
        self.processes.append(modem.stop)
        self.say(f"    {modem.port}: IMEI {IMEI}, SIM card {HOME_ICCID}")

        platform = Platform(broker.port, self.say)
        self.processes.append(platform.close)

        self.step(3, "Starting the agent: it gates the radio, reads the modem and decides")
        agent = self._start_agent(broker.port, modem.port)
        platform.event("bound", since=0)
        platform.event("radio_restored", since=0)
        self._show_modem(modem, "first use: the card is bound to this terminal and may attach")

        self.step(4, f"Someone swaps in a foreign SIM ({FOREIGN_ICCID})")
        mark = platform.mark()
        modem.sim_remove()
        platform.event("sim_removed", mark)
        modem.sim_insert(FOREIGN_ICCID)
        violation = platform.event("binding_violation", mark)
        state = self._show_modem(modem, f"violation {violation['data'].get('reason')}: RF stays off")
        if state["cfun"] != 4:
            raise DemoFailed(f"the radio is at CFUN={state['cfun']}, expected 4")
        foreign = [a for a in state.get("attaches", []) if a.get("iccid") == FOREIGN_ICCID]
        self.say(f"    network attaches by the foreign card: {len(foreign)}")
        if foreign:
            raise DemoFailed("the foreign card attached to the network")

        self.step(5, "The right SIM goes back in")
        mark = platform.mark()
        modem.sim_remove()
        modem.sim_insert(HOME_ICCID)
        platform.event("radio_restored", mark)
        state = self._show_modem(modem, "the bound card is back: radio restored")
        if state["cfun"] != 1:
            raise DemoFailed(f"the radio is at CFUN={state['cfun']}, expected 1")

        self.step(6, "Evidence for the operator: export the signed log and verify it")
        self.say("    Every decision and radio change is also kept on the terminal in a hash-chained log,")
        self.say("    signed with the device key, so an operator can prove what happened offline.")
        bundle = self.dir / "evidence.json"
        self._cli("evidence", "export", "--out", str(bundle))
        entries = json.loads(bundle.read_text())["entries"]
        self.say(f"    {len(entries)} entries (numbered on their own: the log also keeps entries that are not")
        self.say("    platform events, so its numbers differ from the event seq above), for example:")
        for entry in entries:
            if entry["type"] in ("bound", "binding_violation", "radio_blocked", "radio_restored"):
                self.say(f"      entry {entry['seq']:<3} {entry['wall']}  {entry['type']}")
        verdict = self._cli("evidence", "verify", str(bundle))
        self.say(f"    simagent evidence verify: {verdict.strip()}")

        self.step(7, "Stopping the agent (SIGTERM): it flushes and says goodbye")
        mark = platform.mark()
        code = agent.stop()
        platform.wait_for("the offline status", lambda t, d: t.endswith("/status") and d.get("online") is False, mark)
        if code != 0:
            raise DemoFailed(f"the agent exited with {code}")
        self.say("    agent exited 0")

    def _start_agent(self, broker_port: int, modem_port: str) -> AgentProcess:
        from simagent_lab.localagent import AgentProcess, loopback_sections

        agent = AgentProcess(self.dir, loopback_sections(self.dir, modem_port, broker_port))
        self.agent = agent
        self.processes.append(agent.close)
        agent.start()
        try:
            ready = agent.wait_ready()
        except TimeoutError:
            raise DemoFailed("the agent did not report READY") from None
        self.say(f"    the agent says it is ready: {ready.get('STATUS', '')} (under systemd, the service counts as")
        self.say("    started only now, after the first binding decision)")
        return agent

    def _cli(self, *args: str) -> str:
        from simagent_lab.localagent import CliFailed

        try:
            return self.agent.cli(*args, check=True).stdout
        except CliFailed as exc:
            raise DemoFailed(str(exc)) from None

    def _show_modem(self, modem: ProcessFakeModem, comment: str) -> dict:
        state = modem.state()
        radio = {1: "on", 4: "RF off"}.get(state["cfun"], "?")
        self.say(f"    modem: CFUN={state['cfun']} ({radio}), SIM {state.get('iccid')} - {comment}")
        return state

    def _show_agent_log(self) -> None:
        agent = getattr(self, "agent", None)
        if agent is not None:
            self.say(f"--- agent log ({agent.log_path}) ---")
            self.say(agent.log[-4000:])


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="walk through bind, foreign SIM, radio block and restore on a fake modem")
    parser.add_argument("--keep", action="store_true", help="keep the demo's working directory (logs, state, evidence)")
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.keep:
        directory = Path(tempfile.mkdtemp(prefix="simagent-demo-"))
        print(f"working directory: {directory}")
        return Demo(directory).run()
    with tempfile.TemporaryDirectory(prefix="simagent-demo-") as tmp:
        return Demo(Path(tmp)).run()

"""The ``meshmq`` command: publish, subscribe, look at peers, run the demo.

Every subcommand starts a short-lived agent of its own (service ``meshmq-cli``
unless ``--service`` says otherwise) in the chosen mesh, on loopback unless
``--interface`` says otherwise. Exit codes: 0 success, 1 the mesh did not do
what was asked (timeout, missing messages), 2 bad input, 130 interrupted.
Bad input never shows a traceback: one ``meshmq: error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from ._config import Config
from ._errors import MeshError, UsageError
from ._message import Message
from ._sync import Agent
from ._topics import check_pattern, check_topic

PROG = "meshmq"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_HUMAN_DATA_LIMIT = 1000  # characters of payload shown per line without --json


class _BadInput(Exception):
    """Raised by the argument parser instead of exiting, so ``main`` owns every exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        raise _BadInput(message + hint)


# --- entry point ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``meshmq`` command line; return the process exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _BadInput as exc:
        return _fail(str(exc), EXIT_USAGE)
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    _merge_mesh_options(args)
    _setup_logging(args.verbose)
    if args.insecure:  # for this command's agents and the processes it starts (meshmq demo)
        os.environ["MESHMQ_INSECURE"] = "1"
    try:
        with _sigterm_as_interrupt():
            return int(args.run(args))
    except _BadInput as exc:
        return _fail(str(exc), EXIT_USAGE)
    except UsageError as exc:  # TopicError, ConfigError, PayloadError: the caller's input
        return _fail(str(exc), EXIT_USAGE)
    except MeshError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `meshmq sub ... | head`: the reader left, which is not an error
        return EXIT_OK


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return code


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr)


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _until(count: int | None, noun: str, seconds: float | None) -> str:
    """How a reading command ends, for its first line: 'N NOUNs or Ss', or 'Ctrl-C'."""
    ends = []
    if count:
        ends.append(f"{count} {noun}{'s' if count > 1 else ''}")
    if seconds is not None:
        ends.append(f"{seconds:g}s")
    return " or ".join(ends) or "Ctrl-C"


def _arrivals(source: Any, seconds: float | None) -> Iterator[Any]:
    """What a blocking subscription or tap receives, as it arrives, until it is closed or
    ``seconds`` have passed. Short waits keep Ctrl-C prompt."""
    deadline = None if seconds is None else time.monotonic() + seconds
    while True:
        wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
        if wait <= 0:
            return
        item = source.get(wait)
        if item is not None:
            yield item
        elif source.closed:
            return


def _one_line(text: str) -> str:
    return " ".join(text.split())


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let ``kill PID`` end a command as cleanly as Ctrl-C (the agent says goodbye)."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (main() called from a test's thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _setup_logging(verbosity: int) -> None:
    """Warnings by default; -v shows meshmq's info log, -vv everything at debug level."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=logging.WARNING if verbosity < 2 else logging.DEBUG,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("meshmq").setLevel(level)


# --- the parser -------------------------------------------------------------------------

_MAIN_EPILOG = """\
examples:
  meshmq sub 'orders.>'                          watch every order event
  meshmq tap --events all                        every message and delivery event in the mesh, live
  meshmq graph --mermaid                         the mesh's services, subscriptions and traffic as a picture
  meshmq pub orders.placed '{"orderId": "ORD-1"}' --type OrderPlaced
  meshmq peers                                   who is in the mesh, subscribed to what
  meshmq routes --topic orders.placed            who would receive a message on orders.placed
  meshmq doctor                                  why agents do (not) find each other, with fixes
  meshmq demo                                    the order workflow, one process per service
  meshmq config                                  every setting and its MESHMQ_* variable
  meshmq dlq ls --service billing                messages billing's handlers could not take
  meshmq outbox --service orders                 what orders published that is not acknowledged yet
  meshmq health --service orders                 is orders all right? (exit code for scripts)
  meshmq authority init; meshmq cert issue ...    a mesh authority and its agents' certificates

Agents find each other by mDNS on loopback (127.0.0.1) by default; use --seed
where multicast does not reach. Run 'meshmq COMMAND --help' for details.
"""

_PUB_EPILOG = """\
DATA is sent as JSON when it parses as JSON, else as a text string:
  meshmq pub orders.placed '{"orderId": "ORD-0001", "totalAmount": 59.97}' --type OrderPlaced
  meshmq pub greetings hello                      a string: "hello"
  meshmq pub counters.hits 42                     the number 42 ('"42"' sends the string)
  meshmq pub files.chunk 'raw text' --raw         UTF-8 bytes, untouched
  echo '{"a": 1}' | meshmq pub some.topic -       read DATA from stdin
  meshmq pub orders.placed '{}' --key CUST-1 --header trace=abc --count 3

The command first waits for the mesh to settle (--timeout), so that subscribers
already running receive the message, then prints one message id per line. If
no subscriber of TOPIC is known, it warns on stderr and still exits 0.
"""

_SUB_EPILOG = """\
Each message is one line: time, topic, type, source, key (if any) and data.
  meshmq sub 'orders.>'                           until Ctrl-C
  meshmq sub orders.placed --count 1 --timeout 10 exit 1 if nothing came in 10 s
  meshmq sub 'orders.*' --queue billing           share the work with other members of 'billing'
  meshmq sub '>' --json | jq .data                every message, as JSON lines

With --json each line is an object with id, timestamp (seconds since the
epoch), time (ISO 8601, UTC), topic, type, source, node, key, headers,
schema_version and data. A bytes payload comes as "data_base64" (base64 of the
bytes) instead of "data"; bytes nested inside a structured payload become
base64 strings. Exit codes: 0 done (or --timeout without --count), 1 fewer than
--count messages within --timeout, 130 Ctrl-C.
"""

_PEERS_EPILOG = """\
  meshmq peers                       table of service, node id, endpoint, state, subscriptions, last seen
  meshmq peers --all                 also the peers that recently died or left
  meshmq peers --wait 3 --json       a JSON array of peers, after waiting up to 3 s
  meshmq peers --mesh staging --seed tcp://10.0.0.5:7400#KEY

STATE is alive, or suspect when a probe of the peer went unanswered (it is
declared dead unless it refutes in time); with --all, departed peers show as
dead, left or replaced.
Subscriptions show as pattern, or pattern@group for queue groups; 'last seen' is
the time since the peer was last heard from. This command's own agent is not
listed. With --json each peer is an object with service, node, endpoint,
subscriptions (pattern, group) and last_seen_seconds_ago.
"""

_DEMO_EPILOG = """\
Starts four processes: an order service that places orders on 'orders.placed'
(type OrderPlaced) and the inventory, payment and notification services that
handle them. Each prints a trace line per order; at the end a summary table
says how many orders each service handled and how many are missing.
  meshmq demo
  meshmq demo --orders 100 --timeout 30

The demo runs in a fresh mesh of its own unless --mesh is given. It ends every
process it started; it exits 0 when no order is missing, 1 otherwise.
"""

_DLQ_EPILOG = """\
A handler that raises (or nacks) is given the message again, with backoff, up to
max_attempts times; then the message is dead-lettered: kept in that agent's store
with the reason, the attempts, the last error and the message itself.
  meshmq dlq ls --service billing                one line per dead letter
  meshmq dlq ls --service billing --json         a JSON array
  meshmq dlq show ID --service billing           everything about one, payload included
  meshmq dlq replay ID ... --service billing     hand them to their subscription again
  meshmq dlq replay --all --service billing
  meshmq dlq purge ID ... --service billing      delete them (or --all)

--service names the agent whose store to open: <data_dir>/<service>/<instance>
(MESHMQ_DATA_DIR, default ~/.meshmq; --instance, default 0). The agent may be
running: a replay is then picked up by it within a second, and otherwise when it
next starts and subscribes again. A letter goes back only to a subscription with
the same pattern and queue group as the one it failed in.
"""

_OUTBOX_EPILOG = """\
What an agent's outbox holds, per destination: messages published and not yet
acknowledged by that receiver (it is slow, down, or a durable subscriber that has
not come back). Read from the store, so it works whether the agent runs or not.
  meshmq outbox --service orders                 one line per destination
  meshmq outbox --service orders --json          a JSON array

--service names the agent whose store to open: <data_dir>/<service>/<instance>
(MESHMQ_DATA_DIR, default ~/.meshmq; --instance, default 0). An agent with
durability=memory has no store to look at: use agent.outbox() in Python.
"""

_AUTHORITY_EPILOG = """\
A mesh authority is an Ed25519 key pair that signs the certificates of the mesh's
agents and their revocations. Keep its key file on one machine, mode 0600; give every
agent its public key (MESHMQ_AUTHORITY) and a certificate.
  meshmq authority init                       create MESHMQ_HOME/authority.key (0600) and .pub
  meshmq authority init --dir /secure/place   elsewhere
Without an authority, each user's agents on one machine use a development authority
created on first use in MESHMQ_HOME (default ~/.meshmq); several hosts need this one.

Rolling over to a new authority key, with no downtime:
  meshmq authority init --dir /secure/new     the new key pair
  MESHMQ_AUTHORITY=OLD_KEY,NEW_KEY            every agent trusts both (a key file named
                                              there, e.g. authority.pub, is re-read when it changes)
  meshmq cert issue --authority-key /secure/new/authority.key ...   new certificates; agents
                                              take them while running (replace their certificate file)
  MESHMQ_AUTHORITY=NEW_KEY                    once no certificate of the old key is in use
"""

_CERT_EPILOG = """\
  meshmq cert issue --service orders --publish 'orders.>' --subscribe 'payments.*' -o orders.cert
  meshmq cert issue --service audit --subscribe '>' --tap --valid 7d -o audit.cert
  meshmq cert show orders.cert [--json]
  meshmq cert revoke orders.cert -o revoked.txt     revoke a certificate (also: its SERIAL)
  meshmq cert revoke 3f2a9c0d1e4b5a69 -o revoked.txt  revoke a NODE for good (its id or key)

issue signs with the authority key (--authority-key, default MESHMQ_HOME/authority.key)
a certificate for the node key of the service's agent: --key PUBLIC_KEY, or by
default the key beside that agent's store (<data_dir>/<service>/<instance>/node.key,
created if the agent never ran). Give the agent the file: MESHMQ_CERTIFICATE=orders.cert.
Replacing that file while the agent runs renews its certificate without a restart.

revoke signs a revocation with the authority key (--authority-key; default: the
development authority when MESHMQ_AUTHORITY is not set, else MESHMQ_HOME/authority.key),
appends it to -o FILE (or prints it), and hands it to the running agents of the mesh it
finds within --wait seconds; they pass it on by gossip and cut the node off at once,
with no restart. A certificate revoked by its SERIAL (32 hex digits) or FILE may be
replaced by a new one; a NODE (16 hex digits, as 'meshmq peers' shows, or its public
key) is revoked for good. Agents started later learn revocations from their peers, or
from the file: MESHMQ_REVOCATIONS=revoked.txt. --offline only writes the revocation.
"""

_CONFIG_EPILOG = """\
  meshmq config                 every setting: MESHMQ_* variable, default, description
  meshmq config --json          the same as a JSON array
  MESHMQ_MESH=staging meshmq config   a value set in the environment is shown as 'set:'
"""


def _build_parser() -> _Parser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG, formatter_class=fmt, epilog=_MAIN_EPILOG,
        description="meshmq: a brokerless messaging mesh. Publish, subscribe and look at the mesh from a shell.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"meshmq {__version__}")
    _add_mesh_options(parser, top=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", required=True)

    def command(name: str, summary: str, epilog: str, run: Callable[[argparse.Namespace], int]) -> _Parser:
        sub: _Parser = commands.add_parser(name, help=summary, description=summary, epilog=epilog,
                                           formatter_class=fmt)
        sub.set_defaults(run=run)
        return sub

    pub = command("pub", "Publish a message to a topic.", _PUB_EPILOG, _cmd_pub)
    pub.add_argument("topic", metavar="TOPIC", help="concrete topic, e.g. orders.placed (no wildcards)")
    pub.add_argument("data", metavar="DATA", help="payload: JSON if it parses, else a string; '-' reads stdin")
    pub.add_argument("--type", help="event type, e.g. OrderPlaced (what handlers registered with on() match)")
    pub.add_argument("--key", help="partition key: one key stays on one queue-group member, in order")
    pub.add_argument("--header", action="append", default=[], metavar="K=V", help="a free header (repeatable)")
    pub.add_argument("--raw", action="store_true", help="send DATA as UTF-8 bytes instead of parsing it")
    pub.add_argument("--timeout", type=_seconds, default=2.0, metavar="S",
                     help="seconds to wait for the mesh to settle before publishing (default: 2)")
    pub.add_argument("--count", type=_positive_int, default=1, metavar="N",
                     help="publish the message N times (default: 1)")
    _add_mesh_options(pub)

    sub = command("sub", "Print the messages matching a pattern as they arrive.", _SUB_EPILOG, _cmd_sub)
    sub.add_argument("pattern", metavar="PATTERN", help="topic pattern: '*' matches one token, '>' the rest")
    sub.add_argument("--queue", metavar="G", help="join queue group G: each message goes to one member")
    sub.add_argument("--count", type=_positive_int, metavar="N", help="exit after N messages")
    sub.add_argument("--timeout", type=_seconds, metavar="S", help="exit after S seconds")
    sub.add_argument("--json", action="store_true", help="one JSON object per message (see below)")
    _add_mesh_options(sub)

    from ._tapcli import add_commands as add_tap_commands

    add_tap_commands(command, _add_mesh_options, _positive_int, _seconds)

    from ._graph import GRAPH_EPILOG, cmd_graph

    graph = command("graph", "Print the mesh's topology (services, subscriptions, traffic) as DOT or Mermaid.",
                    GRAPH_EPILOG, cmd_graph)
    graph.add_argument("--mermaid", action="store_true", help="Mermaid instead of Graphviz DOT")
    graph.add_argument("--wait", type=_seconds, default=1.5, metavar="S",
                       help="seconds to wait for discovery, at most (default: 1.5)")
    graph.add_argument("--observe", type=_seconds, default=0.0, metavar="S",
                       help="also watch the traffic for S seconds (a tap) to show who publishes what")
    _add_mesh_options(graph)

    peers = command("peers", "List the nodes of the mesh and what they subscribe to.", _PEERS_EPILOG, _cmd_peers)
    peers.add_argument("--wait", type=_seconds, default=1.5, metavar="S",
                       help="seconds to wait for discovery, at most (default: 1.5)")
    peers.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    peers.add_argument("--all", action="store_true", help="also list peers that recently died or left")
    _add_mesh_options(peers)

    routes = command("routes", "Show which nodes and queue groups receive which topics.", _ROUTES_EPILOG,
                     _cmd_routes)
    routes.add_argument("--topic", metavar="T", help="only who would receive a message published on T")
    routes.add_argument("--wait", type=_seconds, default=1.5, metavar="S",
                        help="seconds to wait for discovery, at most (default: 1.5)")
    routes.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    _add_mesh_options(routes)

    doctor = command("doctor", "Check why agents do or do not find each other, and how to fix it.",
                     _DOCTOR_EPILOG, _cmd_doctor)
    doctor.add_argument("--wait", type=_seconds, default=2.0, metavar="S",
                        help="seconds to listen for peers and announcements (default: 2)")
    doctor.add_argument("--max-skew", type=_seconds, default=1.0, metavar="S",
                        help="clock difference with a peer that counts as skew (default: 1 s)")
    doctor.add_argument("--json", action="store_true", help="print the findings as a JSON array")
    _add_mesh_options(doctor)

    demo = command("demo", "Run the order workflow demo: four services, one process each.", _DEMO_EPILOG,
                   _cmd_demo)
    demo.add_argument("--orders", type=_positive_int, default=20, metavar="N",
                      help="orders to place (default: 20)")
    demo.add_argument("--timeout", type=_seconds, default=20.0, metavar="S",
                      help="give up after S seconds (default: 20)")
    demo.add_argument("--drop", choices=("inventory", "payment", "notification"), help=argparse.SUPPRESS)
    _add_mesh_options(demo)

    dlq = command("dlq", "List, show, replay or purge the dead letters of an agent.", _DLQ_EPILOG, _cmd_dlq)
    dlq.add_argument("action", choices=("ls", "show", "replay", "purge"), help="what to do")
    dlq.add_argument("ids", nargs="*", metavar="ID", help="dead-letter ids (show: exactly one)")
    dlq.add_argument("--all", action="store_true", help="replay or purge every dead letter")
    _add_instance_option(dlq)
    dlq.add_argument("--json", action="store_true", help="JSON instead of text (ls, show)")
    _add_mesh_options(dlq)

    authority = command("authority", "Create a mesh authority (the key that signs certificates).",
                        _AUTHORITY_EPILOG, _cmd_authority)
    authority.add_argument("action", choices=("init",), help="init: create the key pair")
    authority.add_argument("--dir", metavar="DIR", help="where to write it (default: MESHMQ_HOME, ~/.meshmq)")

    cert = command("cert", "Issue, show or revoke an agent's certificate.", _CERT_EPILOG, _cmd_cert)
    cert.add_argument("action", choices=("issue", "show", "revoke"),
                      help="issue a certificate, show one (or a revocation file), or revoke one")
    cert.add_argument("file", nargs="?", metavar="FILE",
                      help="show: the certificate or revocation file; revoke: a certificate FILE, its SERIAL, "
                           "or a NODE (id or public key)")
    cert.add_argument("--publish", action="append", default=[], metavar="PATTERN",
                      help="issue: topics the agent may publish on (repeatable)")
    cert.add_argument("--subscribe", action="append", default=[], metavar="PATTERN",
                      help="issue: topics the agent may subscribe to (repeatable)")
    cert.add_argument("--tap", action="store_true", help="issue: the right to watch traffic (meshmq tap)")
    cert.add_argument("--valid", default="365d", metavar="DURATION",
                      help="issue: how long it is valid: 30d, 12h, 90m (default: 365d)")
    cert.add_argument("--key", metavar="PUBLIC_KEY", help="issue: the agent's node public key")
    cert.add_argument("--instance", type=int, default=0, metavar="N",
                      help="issue: which instance's key, without --key (default: 0)")
    cert.add_argument("--authority-key", metavar="FILE", help="issue, revoke: the authority key file")
    cert.add_argument("-o", "--output", metavar="FILE",
                      help="issue: write here instead of stdout; revoke: append the revocation to this file")
    cert.add_argument("--offline", action="store_true",
                      help="revoke: only write the revocation, do not hand it to running agents")
    cert.add_argument("--wait", type=_seconds, default=5.0, metavar="S",
                      help="revoke: seconds to find the running agents and see each take it (default: 5)")
    cert.add_argument("--json", action="store_true", help="show: a JSON object")
    _add_mesh_options(cert)

    outbox = command("outbox", "Show what waits in an agent's outbox, per destination.", _OUTBOX_EPILOG,
                     _cmd_outbox)
    _add_instance_option(outbox)
    outbox.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    _add_mesh_options(outbox)

    policy = command("policy", "Check a policy file (rate limits, retries, TTL, priorities, circuit breakers, "
                               "routing rules, schemas).", _POLICY_EPILOG, _cmd_policy)
    policy.add_argument("action", choices=("check", "push", "show"),
                        help="check FILE; push FILE to the mesh (signed by the authority); show the policy in force")
    policy.add_argument("file", metavar="FILE", nargs="?", help="the policy file (TOML; see docs/policies.md)")
    policy.add_argument("--json", action="store_true", help="print the rules as JSON")
    policy.add_argument("--authority-key", metavar="FILE",
                        help="push: the authority key to sign with (default: the development authority when "
                             "MESHMQ_AUTHORITY is not set, else MESHMQ_HOME/authority.key)")
    policy.add_argument("--wait", type=_seconds, default=5.0, metavar="S",
                        help="push: seconds to wait for the agents to take it; show: to meet the mesh (default 5)")
    _add_mesh_options(policy)

    schema = command("schema", "Add a message schema to the mesh (signed by the authority), show one, or list "
                               "the types and versions the mesh knows.", _SCHEMA_EPILOG, _cmd_schema)
    schema.add_argument("action", choices=("ls", "add", "show"),
                        help="ls: every (type, version), who declares it and whether it was pushed; add TYPE VERSION "
                             "FILE: sign a schema and hand it to the agents; show TYPE [VERSION]: the schemas "
                             "pushed for TYPE")
    schema.add_argument("type", metavar="TYPE", nargs="?", help="add, show: the message type, e.g. OrderPlaced")
    schema.add_argument("version", metavar="VERSION", nargs="?",
                        help="add: the schema version, a whole number from 1; show: only this version")
    schema.add_argument("file", metavar="FILE", nargs="?",
                        help="add: the JSON Schema file (the subset meshmq checks: see docs/policies.md)")
    schema.add_argument("--authority-key", metavar="FILE",
                        help="add: the authority key to sign with (default: the development authority when "
                             "MESHMQ_AUTHORITY is not set, else MESHMQ_HOME/authority.key)")
    schema.add_argument("--wait", type=_seconds, default=None, metavar="S",
                        help="add: seconds to find the agents and see each hold the schema (default: 5); ls, "
                             "show: seconds to meet the mesh, at most (default: 1.5)")
    schema.add_argument("--json", action="store_true", help="ls, show: print JSON")
    _add_mesh_options(schema)

    from ._health import HEALTH_EPILOG, cmd_health

    health = command("health", "Check an agent of this host: peers, outbox backlog and age, dead letters, "
                               "certificate.", HEALTH_EPILOG, cmd_health)
    _add_instance_option(health)
    health.add_argument("--wait", type=_seconds, default=1.5, metavar="S",
                        help="seconds to watch the mesh for its peers (default: 1.5)")
    health.add_argument("--json", action="store_true", help="print JSON instead of text")
    health.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    _add_mesh_options(health)

    config = command("config", "List every setting with its MESHMQ_* variable, default and meaning.",
                     _CONFIG_EPILOG, _cmd_config)
    config.add_argument("--json", action="store_true", help="print a JSON array instead of text")
    return parser


def _add_instance_option(parser: argparse.ArgumentParser) -> None:
    """``--instance``, for the commands that open the store of an agent of this host."""
    parser.add_argument("--instance", type=int, default=0, metavar="N",
                        help="which instance of the service, when several ran on this host (default: 0)")


def _add_mesh_options(parser: argparse.ArgumentParser, top: bool = False, service: bool = True) -> None:
    """The options every command shares. They are accepted before and after the command
    name; the subcommand's copies write to their own names (see :func:`_merge_mesh_options`)."""
    group = parser.add_argument_group("mesh options")
    default = None if top else argparse.SUPPRESS
    suffix = "" if top else "_sub"
    group.add_argument("--mesh", dest="mesh" + suffix, default=default, metavar="NAME",
                       help="mesh name (default: $MESHMQ_MESH or 'default')")
    group.add_argument("--seed", dest="seed" + suffix, action="append", default=default, metavar="ENDPOINT",
                       help="static peer endpoint with its key, tcp://HOST:PORT#KEY as meshmq peers shows it (repeatable)")
    group.add_argument("--interface", dest="interface" + suffix, action="append", default=default, metavar="IP",
                       help="address to bind and announce on (repeatable; default: 127.0.0.1)")
    if service:  # (tap and replay use --service as a filter; their agent is named before the command)
        group.add_argument("--service", dest="service" + suffix, default="meshmq-cli" if top else default,
                           metavar="NAME", help="service name of this command's agent (default: meshmq-cli)")
    group.add_argument("-v", "--verbose", dest="verbose" + suffix, action="count", default=0 if top else default,
                       help="log more (-v info, -vv debug)")
    group.add_argument("--insecure", dest="insecure" + suffix, action="store_true", default=False if top else default,
                       help="for experiments only: no certificates, encryption or signatures (as MESHMQ_INSECURE=1); "
                            "reaches only other insecure agents")


def _merge_mesh_options(args: argparse.Namespace) -> None:
    for name in ("mesh", "service"):
        if hasattr(args, name + "_sub"):
            setattr(args, name, getattr(args, name + "_sub"))
    for name in ("seed", "interface"):
        extra = getattr(args, name + "_sub", None) or []
        setattr(args, name, (getattr(args, name) or []) + extra)
    args.verbose += getattr(args, "verbose_sub", 0)
    args.insecure = args.insecure or getattr(args, "insecure_sub", False)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds, zero or more")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides from the mesh options (MESHMQ_* variables give the rest)."""
    overrides: dict[str, Any] = {}
    if args.mesh is not None:
        overrides["mesh"] = args.mesh
    if args.seed:
        overrides["seeds"] = list(args.seed)
    if args.interface:
        overrides["interfaces"] = list(args.interface)
    return overrides


def _agent(args: argparse.Namespace) -> Agent:
    """A blocking agent configured from the mesh options (and MESHMQ_* for the rest)."""
    return Agent(args.service, **_overrides(args))


# --- pub --------------------------------------------------------------------------------


def parse_data(text: str, raw: bool = False) -> Any:
    """DATA of ``meshmq pub``: UTF-8 bytes with ``raw``, else JSON if it parses, else the string."""
    if raw:
        return text.encode()
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_headers(items: Sequence[str]) -> dict[str, str]:
    """``["k=v", ...]`` to a dict; a malformed item is bad input."""
    headers: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise _BadInput(f"--header {item!r} must look like NAME=VALUE")
        headers[name.strip()] = value
    return headers


def _cmd_pub(args: argparse.Namespace) -> int:
    check_topic(args.topic)
    headers = parse_headers(args.header)
    text = sys.stdin.read() if args.data == "-" else args.data
    data = parse_data(text.rstrip("\n") if args.data == "-" else text, args.raw)
    with _agent(args) as agent:
        agent.wait_settled(args.timeout, quiet_period=min(0.5, args.timeout / 2))
        before = agent.stats().get("published_without_subscribers", 0)
        for _ in range(args.count):
            mid = agent.publish(args.topic, data, type=args.type, key=args.key, headers=headers or None)
            print(mid, flush=True)
        unheard = agent.stats().get("published_without_subscribers", 0) - before
        mesh = agent.config.mesh
    if unheard:
        _warn(f"no subscriber of {args.topic!r} is known in mesh {mesh!r} after waiting {args.timeout:g}s: "
              f"{'the message was' if unheard == 1 else f'{unheard} messages were'} published to no one")
    return EXIT_OK


# --- sub --------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return repr(value)


def message_json(msg: Message) -> str:
    """One message as a JSON line (the format of ``meshmq sub --json``)."""
    obj: dict[str, Any] = {
        "id": msg.id,
        "timestamp": msg.timestamp,
        "time": datetime.datetime.fromtimestamp(msg.timestamp, datetime.timezone.utc).isoformat(),
        "topic": msg.topic,
        "type": msg.type,
        "source": msg.source,
        "node": msg.node,
        "key": msg.key,
        "headers": msg.headers,
        "schema_version": msg.schema_version,
    }
    try:
        data = msg.data
    except MeshError as exc:
        obj["data_error"] = str(exc)
    else:
        if isinstance(data, bytes):
            obj["data_base64"] = base64.b64encode(data).decode("ascii")
        else:
            obj["data"] = data
    return json.dumps(obj, ensure_ascii=False, default=_json_default)


def message_line(msg: Message) -> str:
    """One message as a readable line: time, topic, type, source, [key=K,] data."""
    when = datetime.datetime.fromtimestamp(msg.timestamp).strftime("%H:%M:%S.%f")[:-3]
    try:
        data = msg.data
        shown = repr(data) if isinstance(data, bytes) else json.dumps(data, ensure_ascii=False,
                                                                     default=_json_default)
    except MeshError as exc:
        shown = f"<{exc}>"
    if len(shown) > _HUMAN_DATA_LIMIT:
        shown = f"{shown[:_HUMAN_DATA_LIMIT]}... ({len(msg.raw)} bytes; --json shows all)"
    fields = [when, msg.topic, msg.type or "-", msg.source]
    if msg.key is not None:
        fields.append(f"key={msg.key}")
    fields.append(shown)
    return "  ".join(fields)


def _cmd_sub(args: argparse.Namespace) -> int:
    check_pattern(args.pattern)
    render = message_json if args.json else message_line
    with _agent(args) as agent:
        subscription = agent.subscribe(args.pattern, queue=args.queue)
        _note(f"listening on {args.pattern!r}{f' in queue group {args.queue!r}' if args.queue else ''} "
              f"in mesh {agent.config.mesh!r} until {_until(args.count, 'message', args.timeout)}")
        received = 0
        for msg in _arrivals(subscription, args.timeout):
            received += 1
            print(render(msg), flush=True)
            if received == args.count:
                break
    if args.count is not None and received < args.count:
        _note(f"{received} of {args.count} messages received within {args.timeout:g}s")
        return EXIT_FAILED
    return EXIT_OK


_ROUTES_EPILOG = """\
  meshmq routes                          every subscription in the mesh: pattern, queue group, service, node
  meshmq routes --topic orders.placed    who would receive a message published on orders.placed
  meshmq routes --json                   the same as a JSON array

Each plain subscriber of a topic gets its own copy of a message; a queue group
(shown in the GROUP column) gets one copy, taken by one of its members. With
--json each route is an object with pattern, group, service and node.
"""


_DOCTOR_EPILOG = """\
  meshmq doctor                                  check this host with the default settings
  meshmq doctor --mesh shop --interface 10.0.0.5 the settings of the agents you run
  meshmq doctor --seed tcp://10.0.0.7:7400#KEY   does that seed answer?

Checks, each with the fix when something is wrong: the configured interfaces
exist on this host; this agent can bind; mDNS works (its own announcement is
heard, so multicast is not blocked); agents announced in another mesh when none
are in yours (a mesh name mismatch); peers found; announced endpoints and seeds
that do not answer; clock skew with peers. Exit code 0 when all is well, 1 when
something needs attention. A short-lived agent named meshmq-doctor joins the
mesh while it runs.
"""


# --- doctor -----------------------------------------------------------------------------


def _cmd_doctor(args: argparse.Namespace) -> int:
    import asyncio

    from ._config import Config
    from ._doctor import OK, as_json, diagnose, render

    config = Config.load(**_overrides(args))
    findings = asyncio.run(diagnose(config, wait=args.wait, max_skew=args.max_skew))
    print(json.dumps(as_json(findings), indent=2) if args.json else render(findings))
    return EXIT_OK if all(f.level == OK for f in findings) else EXIT_FAILED


# --- routes -----------------------------------------------------------------------------


def _cmd_routes(args: argparse.Namespace) -> int:
    with _agent(args) as agent:
        agent.wait_settled(args.wait, quiet_period=args.wait / 3)
        routes = [r for r in agent.routes(args.topic) if r.node != agent.node_id]
        mesh = agent.config.mesh
    if args.json:
        print(json.dumps([{"pattern": r.pattern, "group": r.group, "service": r.service, "node": r.node}
                          for r in routes], indent=2))
        return EXIT_OK
    if not routes:
        what = f"no subscriber of {args.topic!r}" if args.topic else "no subscriptions"
        _note(f"{what} in mesh {mesh!r} within {args.wait:g}s")
        return EXIT_OK
    if args.topic:
        copies = len({r.node for r in routes if r.group is None}) + len({r.group for r in routes if r.group})
        print(f"{args.topic}: {copies} cop{'y' if copies == 1 else 'ies'} per message")
    rows = [("PATTERN", "GROUP", "SERVICE", "NODE")]
    rows += [(r.pattern, r.group or "-", r.service, r.node) for r in routes]
    print(_table(rows))
    return EXIT_OK


# --- peers ------------------------------------------------------------------------------


def _subscriptions_text(subscriptions: Sequence[tuple[str, str | None]]) -> str:
    return ", ".join(p if g is None else f"{p}@{g}" for p, g in subscriptions) or "-"


def _cmd_peers(args: argparse.Namespace) -> int:
    with _agent(args) as agent:
        agent.wait_settled(args.wait, quiet_period=args.wait / 3)
        peers = agent.peers(departed=args.all)
        mesh = agent.config.mesh
    if args.json:
        print(json.dumps([
            {"service": p.service, "node": p.node, "endpoint": p.endpoint, "state": p.state,
             "subscriptions": [{"pattern": pat, "group": grp} for pat, grp in p.subscriptions],
             "last_seen_seconds_ago": round(p.last_seen, 3)}
            for p in peers
        ], indent=2))
        return EXIT_OK
    if not peers:
        _note(f"no peers found in mesh {mesh!r} within {args.wait:g}s")
        return EXIT_OK
    rows = [("SERVICE", "NODE", "ENDPOINT", "STATE", "SUBSCRIPTIONS", "LAST SEEN")]
    rows += [(p.service, p.node, p.endpoint, p.state, _subscriptions_text(p.subscriptions),
              f"{p.last_seen:.1f}s ago") for p in peers]
    print(_table(rows))
    return EXIT_OK


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# --- dlq --------------------------------------------------------------------------------


def _agent_store(args: argparse.Namespace, what: str) -> tuple[Any, str]:
    """The store directory of the agent named by --service/--instance, and how to open it."""
    from pathlib import Path

    if args.service == "meshmq-cli":  # the default: this command's own agent, which keeps nothing
        raise _BadInput(f"name the agent whose {what} to open: --service NAME")
    if args.instance < 0:
        raise _BadInput("--instance must be 0 or more")
    cfg = Config.load()
    root = cfg.data_dir if cfg.data_dir is not None else Path.home() / ".meshmq"
    directory = root / args.service / str(args.instance)
    if not (directory / "env").exists():
        raise _BadInput(f"no store of service {args.service!r} (instance {args.instance}) in {root}")
    return directory, cfg.durability if cfg.durability != "memory" else "fsync"


def _signing_authority(args: argparse.Namespace, cfg: Config, what: str, *, check_trusted: bool = True) -> Any:
    """The authority key that signs ``what`` (a policy, a schema, a revocation): --authority-key,
    else the one MESHMQ_AUTHORITY implies, else this user's development authority. With
    ``check_trusted``, a key MESHMQ_AUTHORITY does not name is refused (the agents would)."""
    from ._security import Authority, home, parse_authorities

    if args.authority_key:
        authority = Authority.load(Path(args.authority_key))
    elif cfg.authority is None:
        authority = Authority.development()
        _note(f"signing with this user's development authority ({home()}): MESHMQ_AUTHORITY is not set")
    else:
        authority = Authority.load(home() / "authority.key")
    if cfg.authority is not None and check_trusted:
        try:
            trusted = parse_authorities(cfg.authority, read=lambda path: Path(path).expanduser().read_text())
        except OSError as exc:
            raise _BadInput(f"MESHMQ_AUTHORITY names a file that cannot be read: {exc.strerror}") from None
        if authority.public not in trusted:
            raise _BadInput(f"the authority key {authority.text[:12]}… is not one MESHMQ_AUTHORITY names: the "
                            f"agents would refuse its {what}")
    return authority


_POLICY_EPILOG = """\
  meshmq policy check policy.toml         exit 0 and a summary if it is good, else exit 2 naming
                                          the line, the rule and what is wrong
  meshmq policy check policy.toml --json  the rules as agents would read them
  meshmq policy push policy.toml          sign it with the authority and hand it to the mesh;
                                          exit 1 if some agent did not take it within --wait
  meshmq policy show                      the version and rules in force in the mesh

A policy file has a version and [[rule]] tables; each rule matches by topic pattern
and/or publishing service and sets rate limits, retries, TTL, priority (send lanes),
a circuit breaker, extra routes by content (a small expression language) and a
required schema. Every agent enforces the policy in force; a pushed one replaces it
whole at run time (a higher version only). An agent started with policy_file
(MESHMQ_POLICY_FILE) keeps that file and takes no pushed policy.
docs/policies.md has a complete example.
"""


_SCHEMA_EPILOG = """\
  meshmq schema add OrderPlaced 2 order-v2.json   sign the schema and spread it: every agent
                                                  checks OrderPlaced version 2 with it
  meshmq schema show OrderPlaced                  the pushed schemas of OrderPlaced (JSON)
  meshmq schema show OrderPlaced 2 --json         version 2 only, with when it was signed
  meshmq schema ls                                TYPE, VERSION, the services that declare it in
                                                  code, and when it was pushed (if it was)

A schema is JSON Schema, the subset meshmq checks (type, properties, required,
additionalProperties, items, enum, const, minimum/maximum, minLength/maxLength,
pattern, minItems/maxItems), at most 64 KiB. 'add' checks the file (exit 2 naming the
problem), signs it with the mesh authority (--authority-key, else as 'meshmq policy
push' does), joins the mesh briefly, hands it to the agents it finds and waits (--wait)
until each holds it (exit 1 if some did not). Agents pass it on by gossip and keep it
in their store; agents that start later learn it from their peers. Pushing a schema for
a type and version again replaces it everywhere (the one signed last wins).

Agents check what they publish (SchemaError names the field and the rule) and what they
receive (dead-lettered, reason 'schema') against it. A schema declared in code
(agent.schema("OrderPlaced", 2, {...})) wins in its agent. Agents with --insecure /
MESHMQ_INSECURE=1 take no pushed schemas (their trust comes from the authority):
declare schemas in code there.
"""


def _pushing_agent(args: argparse.Namespace, cfg: Config, authority: Any, service: str) -> Agent:
    """A short-lived agent that hands a signed document to the mesh. Under a real authority
    it is certified here, with no rights to publish or subscribe, for ten minutes."""
    agent = Agent(service, durability="memory", **_overrides(args))
    if cfg.authority is not None:
        inner, now = agent._agent, time.time()
        inner._own_certificate = authority.issue(node_key=inner._keys.public, service=service, mesh=cfg.mesh,
                                                 publish=(), subscribe=(), tap=False,
                                                 not_before=now - 60, not_after=now + 600)
    return agent


def _cmd_schema(args: argparse.Namespace) -> int:
    if args.action == "add":
        return _add_schema(args)
    if args.action == "ls" and args.type is not None:
        raise _BadInput("schema ls takes no TYPE: it lists every type")
    if args.action == "show" and args.type is None:
        raise _BadInput("schema show takes the message TYPE (and a VERSION, optionally)")
    if args.file is not None:
        raise _BadInput(f"schema {args.action} takes no FILE")
    version = _schema_version(args.version) if args.version is not None else None
    wait = 1.5 if args.wait is None else args.wait
    with _agent(args) as agent:
        inner = agent._agent
        agent.wait_settled(wait, quiet_period=wait / 3)
        if inner._secure:  # the peers' answers bring the schemas pushed to the mesh
            agent._run(inner._wait_for_schemas(lambda keys: True, wait), timeout=wait + 5)
        declared: dict[tuple[str, int], set[str]] = {}
        records = [m.record for m in inner._node.peers.values()] if inner._node is not None else []
        for record in records:
            for pair in record.schemas:
                declared.setdefault((pair[0], pair[1]), set()).add(record.service)
        pushed = dict(inner._registry.entries)
    if args.action == "show":
        return _show_schema(args.type, version, declared, pushed, args.json)
    rows: list[dict[str, Any]] = [{"type": t, "version": v, "services": sorted(declared.get((t, v), ())),
                                    "pushed": _iso(pushed[(t, v)].at) if (t, v) in pushed else None}
                                   for t, v in sorted(set(declared) | set(pushed))]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        _note("no schemas declared or pushed in the mesh")
        return EXIT_OK
    print(_table([("TYPE", "VERSION", "DECLARED IN CODE BY", "PUSHED")]
                 + [(r["type"], str(r["version"]), ", ".join(r["services"]) or "-", r["pushed"] or "-")
                    for r in rows]))
    return EXIT_OK


def _schema_version(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise _BadInput(f"VERSION {text!r} must be a whole number from 1")
    return int(text)


def _show_schema(type_: str, version: int | None, declared: dict[tuple[str, int], set[str]],
                 pushed: dict[tuple[str, int], Any], as_json: bool) -> int:
    """The bodies of the schemas pushed for ``type_`` (and ``version``), as the mesh holds them."""
    def wanted(pair: tuple[str, int]) -> bool:
        return pair[0] == type_ and (version is None or pair[1] == version)

    documents = [pushed[pair] for pair in sorted(pushed) if wanted(pair)]
    in_code = {pair: services for pair, services in sorted(declared.items()) if wanted(pair) and pair not in pushed}
    what = f"{type_}" + (f" version {version}" if version is not None else "")
    if as_json:
        print(json.dumps([{"type": d.type, "version": d.version, "signed_at": _iso(d.at), "digest": d.digest.hex(),
                           "schema": d.schema} for d in documents], indent=2))
    else:
        for d in documents:
            print(f"# {d.type} version {d.version}, pushed, signed {_iso(d.at)}, digest {d.digest.hex()[:16]}")
            print(json.dumps(d.schema, indent=2))
    for (t, v), services in in_code.items():
        _note(f"{t} version {v} is declared in code by {', '.join(sorted(services))}; its body stays in that code "
              "(meshmq schema add shares one)")
    if not documents:
        if not in_code:
            _warn(f"no schema of {what} is known in the mesh")
        return EXIT_FAILED
    return EXIT_OK


def _add_schema(args: argparse.Namespace) -> int:
    """``meshmq schema add TYPE VERSION FILE``: check, sign, and hand to the running agents."""
    import time

    from ._errors import SchemaError
    from ._schema import parse_schema
    from ._security import check_schema_name

    if args.type is None or args.version is None or args.file is None:
        raise _BadInput("schema add takes TYPE VERSION FILE, e.g. schema add OrderPlaced 2 order-v2.json")
    version = _schema_version(args.version)
    check_schema_name(args.type, version)
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except OSError as exc:
        raise _BadInput(f"cannot read {args.file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise _BadInput(f"{args.file} is not UTF-8 text") from None
    try:
        parse_schema(text)
    except SchemaError as exc:
        raise _BadInput(f"{args.file}: {exc}") from None
    cfg = Config.load(**_overrides(args))
    if cfg.insecure:
        raise _BadInput("insecure agents (--insecure, MESHMQ_INSECURE=1) take no schemas pushed to the mesh: "
                        "their trust comes from the mesh authority's signature. Declare the schema in code "
                        "there instead: agent.schema(TYPE, VERSION, {...})")
    authority = _signing_authority(args, cfg, "schema")
    document = authority.sign_schema(mesh=cfg.mesh, type=args.type, version=version, schema_text=text,
                                     at=time.time())
    wait = 5.0 if args.wait is None else args.wait
    agent = _pushing_agent(args, cfg, authority, "meshmq-schema")
    inner = agent._agent
    deadline = time.monotonic() + wait
    pair = (args.type, version)
    with agent:
        agent.wait_settled(timeout=max(0.0, min(wait, 2.0)))
        agent.push_schema(document)
        held = inner._registry.entries.get(pair)
        assert held is not None
        if held.blob != document:  # the mesh holds one signed later (clocks disagree): it stays
            _warn(f"the mesh holds a schema of {args.type} version {version} signed later ({_iso(held.at)}) than "
                  "this one, which is therefore not taken; check the clock of this host")
            return EXIT_FAILED
        rank = (held.at, held.digest)

        def holds(keys: tuple[Any, ...]) -> bool:
            return any((t, v) == pair and (at, d) >= rank for t, v, at, d in keys)

        have, peers = agent._run(inner._wait_for_schemas(holds, max(0.0, deadline - time.monotonic())),
                                 timeout=wait + 5)
    if peers == 0:
        _warn(f"no running agent of mesh {cfg.mesh!r} was found: none has the schema yet")
        return EXIT_FAILED
    if have < peers:
        _warn(f"{have} of {peers} agents confirmed schema {args.type} version {version} within {wait:g}s; the "
              "others learn it by gossip from those that have it")
        return EXIT_FAILED
    _note(f"schema {args.type} version {version} is held by all {peers} agents found")
    return EXIT_OK


def _cmd_policy(args: argparse.Namespace) -> int:
    from ._policy import PolicyError, load

    if args.action == "show":
        if args.file is not None:
            raise _BadInput("policy show takes no FILE: it shows the policy in force in the mesh")
        return _show_policy(args)
    if args.file is None:
        raise _BadInput(f"policy {args.action} takes the policy FILE")
    try:
        text = Path(args.file).read_text()
    except OSError as exc:
        raise _BadInput(f"cannot read {args.file}: {exc.strerror}") from None
    try:
        policy = load(text, args.file)
    except PolicyError as exc:
        raise _BadInput(str(exc)) from None
    if args.action == "push":
        return _push_policy(args, policy.version, text)
    _print_policy(args.file, policy, args.json)
    return EXIT_OK


def _print_policy(name: str, policy: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"version": policy.version, "rules": [_rule_json(r) for r in policy.rules]}, indent=2))
    else:
        print(f"{name}: version {policy.version}, {len(policy.rules)} rule(s), good")
        for rule in policy.rules:
            says = [k for k in ("rate", "retry", "ttl", "priority", "breaker", "routes", "schema")
                    if getattr(rule, k) not in (None, ())]
            match = ".".join(rule.topic) if rule.topic else "every topic"
            print(f"  line {rule.line:<4} {rule.name}: {match}{f' from {rule.service}' if rule.service else ''}: "
                  f"{', '.join(says) or 'nothing'}")


def _push_policy(args: argparse.Namespace, version: int, text: str) -> int:
    """Sign the policy and hand it to the agents of the mesh, waiting until they have it."""
    import time

    cfg = Config.load(**_overrides(args))
    authority = _signing_authority(args, cfg, "policy")
    document = authority.sign_policy(mesh=cfg.mesh, version=version, text=text, at=time.time())
    agent = _pushing_agent(args, cfg, authority, "meshmq-policy")
    inner = agent._agent
    deadline = time.monotonic() + args.wait
    with agent:
        agent.wait_settled(timeout=max(0.0, min(args.wait, 2.0)))
        if inner.policy_version >= version:
            raise _BadInput(f"the mesh has policy version {inner.policy_version} already; push a higher version")
        agent.push_policy(document)
        while True:
            peers = {p.node for p in agent.peers()}
            have = {n for n in peers if inner._policy_versions.get(n, 0) >= version}
            if have == peers or time.monotonic() >= deadline:
                break
            for peer in peers - have:  # ask again: their answer says their version
                member = inner._node.peers.get(peer) if inner._node is not None else None
                if member is not None:
                    agent._call(inner._send_policy, member.endpoint, False)
            time.sleep(0.1)  # bounded by --wait; polling the agents' answers
    if not peers:
        _warn(f"no running agent of mesh {cfg.mesh!r} was found: none has the policy yet")
        return EXIT_FAILED
    if have != peers:
        _warn(f"{len(have)} of {len(peers)} agents confirmed policy version {version} within {args.wait:g}s")
        return EXIT_FAILED
    _note(f"policy version {version} is in force on all {len(peers)} agents found")
    return EXIT_OK


def _show_policy(args: argparse.Namespace) -> int:
    """The policy in force in the mesh, as this command's agent learns it from its peers."""
    import time

    from ._policy import load
    from ._security import check_policy_document

    with _agent(args) as agent:
        inner = agent._agent
        agent.wait_settled(timeout=min(args.wait, 2.0))
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:  # bounded by --wait: the agents' answers to our offer
            versions = dict(inner._policy_versions)
            if versions and max(versions.values()) <= inner.policy_version:
                break
            time.sleep(0.05)
        document, mesh, trusted = inner._policy_document, inner.config.mesh, inner._trusted
    if document is None:
        print(f"mesh {mesh!r}: no policy in force")
        return EXIT_OK
    version, text, at = check_policy_document(document, trusted, mesh)
    policy = load(text, f"version {version}")
    _print_policy(f"mesh {mesh!r} policy", policy, args.json)
    return EXIT_OK


def _rule_json(rule: Any) -> dict[str, Any]:
    import dataclasses

    out = {"name": rule.name, "line": rule.line, "topic": ".".join(rule.topic) if rule.topic else None,
           "service": rule.service}
    for key in ("rate", "retry", "breaker"):
        value = getattr(rule, key)
        out[key] = dataclasses.asdict(value) if value is not None else None
    out.update(ttl=rule.ttl, priority=rule.priority, schema=list(rule.schema) if rule.schema else None,
               routes=[{"when": r.when.text, "to": r.to} for r in rule.routes])
    return out


def _open_store(directory: Path, durability: str) -> Any:
    """An agent's store, opened beside the agent (which may be running), with the node key
    kept there: it decrypts the messages the store holds."""
    from ._seal import StoreCipher
    from ._security import KEY_FILE, NodeKeys, read_key
    from ._store import Store

    def cipher_for(d: Path) -> StoreCipher:
        return StoreCipher(NodeKeys(read_key(d / KEY_FILE, "node")))

    return Store.open(directory, durability=durability, shared=True, cipher_for=cipher_for)


def _cmd_dlq(args: argparse.Namespace) -> int:
    from ._agent import _dead_letter
    from ._store import Batch

    if args.action == "show" and len(args.ids) != 1:
        raise _BadInput("dlq show takes exactly one ID")
    if args.action in ("replay", "purge") and bool(args.ids) == args.all:
        raise _BadInput(f"dlq {args.action} takes ID... or --all")
    if args.action == "ls" and (args.ids or args.all):
        raise _BadInput("dlq ls takes no ID and no --all")
    directory, durability = _agent_store(args, "dead letters")
    with _open_store(directory, durability) as store:
        letters = sorted((_dead_letter(i, r) for i, r in store.dead_letters()), key=lambda d: (d.at, d.id))
        by_id = {d.id: d for d in letters}
        missing = [i for i in args.ids if i not in by_id]
        if missing:
            raise _BadInput(f"no dead letter {', '.join(map(repr, missing[:5]))} in {directory}")
        chosen = letters if args.all else [by_id[i] for i in args.ids]
        if args.action == "ls":
            return _dlq_list(letters, args.json, directory)
        if args.action == "show":
            return _dlq_show(chosen[0], args.json)
        batch = Batch()
        for letter in chosen:
            if args.action == "purge":
                batch.drop_dead_letter(letter.id)
            else:
                batch.request_replay(letter.id)
        if batch:
            store.commit(batch)
    if args.action == "purge":
        _note(f"purged {len(chosen)} dead letter(s)")
    else:
        _note(f"{len(chosen)} dead letter(s) will be handed to their subscription again: by the running agent "
              "within a second, or when it next starts and subscribes")
    return EXIT_OK


def _dlq_record(letter: Any, payload: bool) -> dict[str, Any]:
    msg = letter.message
    out = {"id": letter.id, "at": _iso(letter.at), "reason": letter.reason, "attempts": letter.attempts,
           "error": letter.error, "subscription": letter.pattern, "queue": letter.queue,
           "message_id": msg.id, "topic": msg.topic, "type": msg.type, "source": msg.source, "node": msg.node}
    if payload:
        out["headers"] = msg.headers
        out["key"] = msg.key
        try:
            data = msg.data
            out["data"] = data if not isinstance(data, bytes) else data.decode("utf-8", "backslashreplace")
        except MeshError as exc:
            out["data_error"] = str(exc)
    return out


def _dlq_list(letters: Sequence[Any], as_json: bool, directory: Any) -> int:
    if as_json:
        print(json.dumps([_dlq_record(d, False) for d in letters], indent=2))
        return EXIT_OK
    if not letters:
        _note(f"no dead letters in {directory}")
        return EXIT_OK
    rows = [("ID", "AT", "REASON", "ATTEMPTS", "TOPIC", "SUBSCRIPTION", "ERROR")]
    rows += [(d.id, _iso(d.at), d.reason, str(d.attempts), d.message.topic,
              d.pattern + (f"@{d.queue}" if d.queue else ""), (d.error or "-")[:60]) for d in letters]
    print(_table(rows))
    return EXIT_OK


def _dlq_show(letter: Any, as_json: bool) -> int:
    record = _dlq_record(letter, True)
    if as_json:
        print(json.dumps(record, indent=2, default=repr))
        return EXIT_OK
    width = max(len(k) for k in record)
    for key, value in record.items():
        print(f"{key.ljust(width)}  {value if isinstance(value, str) else json.dumps(value, default=repr)}")
    return EXIT_OK


def _iso(at: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).isoformat(timespec="milliseconds")


# --- authority and certificates -----------------------------------------------------------


def _cmd_authority(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ._security import Authority, home

    directory = Path(args.dir) if args.dir else home()
    authority = Authority.create(directory)  # UsageError (exit 2) if one is there already
    _note(f"created {directory / 'authority.key'} (mode 0600: keep it safe) and {directory / 'authority.pub'}")
    print(authority.text)
    _note("give every agent this public key: MESHMQ_AUTHORITY=" + authority.text)
    return EXIT_OK


def _cmd_cert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ._security import (
        REVOCATION_ARMOR, CertificateError, armor, decode_certificate, decode_revocation, unarmor,
        unarmor_revocations,
    )

    if args.action == "revoke":
        return _revoke(args)
    if args.action == "show":
        if not args.file:
            raise _BadInput("cert show takes the certificate FILE")
        try:
            content = Path(args.file).read_text()
            revocations = REVOCATION_ARMOR[0] in content
            if revocations:
                shown_all = [decode_revocation(data).describe() for data in unarmor_revocations(content)]
            else:
                shown_all = [decode_certificate(unarmor(content)).describe()]
        except OSError as exc:
            raise _BadInput(f"cannot read {args.file}: {exc.strerror}") from None
        except CertificateError as exc:
            raise _BadInput(f"{args.file}: {exc}") from None
        if args.json:
            print(json.dumps(shown_all if revocations else shown_all[0], indent=2))
            return EXIT_OK
        for i, shown in enumerate(shown_all):
            if i:
                print()
            width = max(map(len, shown))
            for key, value in shown.items():
                text = ", ".join(value) if isinstance(value, list) else str(value).lower() if isinstance(
                    value, bool) else str(value)
                print(f"{key.ljust(width)}  {text or '-'}")
        return EXIT_OK
    if args.file:
        raise _BadInput("cert issue takes no FILE (use -o FILE to write the certificate)")
    if args.service == "meshmq-cli":
        raise _BadInput("name the service the certificate is for: --service NAME")
    data = _issue(args)
    if args.output:
        out = Path(args.output)
        out.write_text(armor(data))
        _note(f"wrote {out}; give it to the agent: MESHMQ_CERTIFICATE={out}")
    else:
        sys.stdout.write(armor(data))
    return EXIT_OK


def _issue(args: argparse.Namespace) -> bytes:
    import time
    from pathlib import Path

    from ._security import KEY_FILE, Authority, CertificateError, home, instance_keys, parse_duration, unb64

    validity = parse_duration(args.valid)
    authority = Authority.load(Path(args.authority_key) if args.authority_key else home() / "authority.key")
    if args.key:
        try:
            node_key = unb64(args.key)
        except ValueError:
            node_key = b""
        if len(node_key) != 32:
            raise _BadInput(f"--key {args.key[:60]!r} is not a node public key (43 base64url characters)")
    else:
        cfg = Config.load()
        root = cfg.data_dir if cfg.data_dir is not None else Path.home() / ".meshmq"
        node_key = instance_keys(root, args.service, args.instance).public
        _note(f"for the node key in {root / args.service / str(args.instance) / KEY_FILE}")
    mesh = args.mesh or Config.load().mesh
    now = time.time()
    try:
        return authority.issue(node_key=node_key, service=args.service, mesh=mesh, publish=tuple(args.publish),
                               subscribe=tuple(args.subscribe), tap=args.tap, not_before=now - 60,
                               not_after=now + validity)
    except CertificateError as exc:
        raise _BadInput(str(exc)) from None


def _revoke(args: argparse.Namespace) -> int:
    """``meshmq cert revoke TARGET``: sign, write, and hand to the running agents."""
    import re
    import time
    from pathlib import Path

    from ._security import CertificateError, armor_revocation, decode_certificate, node_id_of, unarmor, unb64

    target = args.file
    if not target:
        raise _BadInput("cert revoke takes what to revoke: a certificate FILE, its SERIAL, or a NODE id or key")
    cfg = Config.load()
    mesh = args.mesh or cfg.mesh
    serial: bytes | None = None
    node: str | None = None
    forget_after = 0.0
    if re.fullmatch(r"[0-9a-fA-F]{32}", target):
        serial = bytes.fromhex(target)
    elif re.fullmatch(r"[0-9a-fA-F]{16}", target):
        node = target.lower()
    elif re.fullmatch(r"[A-Za-z0-9_-]{43}=?", target) and not Path(target).exists():
        node = node_id_of(unb64(target))
    else:
        try:
            cert = decode_certificate(unarmor(Path(target).read_text()))
        except OSError as exc:
            raise _BadInput(f"{target!r} is not a SERIAL (32 hex digits), a NODE (16 hex digits or a node "
                            f"public key) or a readable certificate file: {exc.strerror}") from None
        except CertificateError as exc:
            raise _BadInput(f"{target}: {exc}") from None
        if cert.mesh != mesh:
            raise _BadInput(f"{target} is a certificate of mesh {cert.mesh!r}, not {mesh!r} (use --mesh)")
        serial, forget_after = cert.serial, cert.not_after
        _note(f"revoking certificate {cert.serial.hex()} of {cert.service} (node {cert.node_id})")
    authority = _signing_authority(args, cfg, "revocation", check_trusted=not args.offline)
    data = authority.revoke(mesh=mesh, serial=serial, node=node, at=time.time(), forget_after=forget_after)
    if args.output:
        out = Path(args.output)
        with out.open("a") as f:
            f.write(armor_revocation(data))
        _note(f"appended the revocation to {out}; agents that start later can read it: MESHMQ_REVOCATIONS={out}")
    else:
        sys.stdout.write(armor_revocation(data))
        sys.stdout.flush()
    if args.offline:
        return EXIT_OK
    return _spread_revocation(args, authority, data, cfg)


def _spread_revocation(args: argparse.Namespace, authority: Any, data: bytes, cfg: Config) -> int:
    """Join the mesh briefly with a certificate of our own (no rights: it only gossips), hand
    the revocation to the agents found, and wait until each has it."""
    import time

    agent = Agent(args.service, durability="memory", **_overrides(args))
    inner = agent._agent
    if cfg.authority is not None:  # a real authority: certify this short-lived agent's key ourselves
        now = time.time()
        inner._own_certificate = authority.issue(node_key=inner._keys.public, service=args.service,
                                                 mesh=inner.config.mesh, publish=(), subscribe=(), tap=False,
                                                 not_before=now - 60, not_after=now + 600)
    deadline = time.monotonic() + args.wait
    with agent:
        agent.wait_settled(timeout=max(0.0, min(args.wait, 2.0)))
        agent.add_revocation(data)
        have, peers = agent._run(inner._wait_revocations_spread(max(0.0, deadline - time.monotonic())),
                                 timeout=args.wait + 5)
    if peers == 0:
        _warn(f"no running agent of mesh {inner.config.mesh!r} was found: none has the revocation yet. Agents "
              "learn it from one another, so hand it to one (run this again, or give it the file: "
              "MESHMQ_REVOCATIONS=FILE)")
        return EXIT_OK
    if have < peers:
        _warn(f"{have} of {peers} agents confirmed the revocation within {args.wait:g}s; the others learn it by "
              "gossip from those that have it")
        return EXIT_FAILED
    _note(f"the revocation was taken by all {peers} agents found; they cut the node off")
    return EXIT_OK


# --- outbox -----------------------------------------------------------------------------


def _cmd_outbox(args: argparse.Namespace) -> int:
    from ._delivery import split_lane_key
    from ._policy import PRIORITIES
    from ._wire import Limits, decode_envelope

    directory, durability = _agent_store(args, "outbox")
    with _open_store(directory, durability) as store:
        contents = store.load()
    rows = []
    for key, (epoch, next_seq, acked, service) in sorted(contents.streams.items()):
        node, lane = split_lane_key(key)
        kept = sorted(contents.outbox.get(key, []), key=lambda pair: pair[0])
        oldest = None
        size = 0
        for seq, (entry, _expires) in kept:
            env = entry if isinstance(entry, bytes) else entry[0]
            size += len(env)
            if oldest is None:
                try:
                    oldest = decode_envelope(env, Limits(), seq).timestamp
                except MeshError:
                    pass
        remembered = node in contents.peers
        rows.append({"node": node, "lane": PRIORITIES[lane], "service": service or None, "messages": len(kept), "bytes": size,
                     "oldest": _iso(oldest) if oldest else None, "epoch": epoch, "next_seq": next_seq,
                     "acked": acked, "durable_subscriber": remembered})
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    waiting = [r for r in rows if r["messages"]]
    if not waiting:
        _note(f"the outbox in {directory} is empty ({len(rows)} stream(s), everything acknowledged)")
        return EXIT_OK
    table = [("DESTINATION", "SERVICE", "LANE", "MESSAGES", "BYTES", "OLDEST", "DURABLE", "STREAM")]
    table += [(r["node"], r["service"] or "?", r["lane"], str(r["messages"]), str(r["bytes"]), r["oldest"] or "-",
               "yes" if r["durable_subscriber"] else "no", f"{r['epoch']}:{r['acked']}..{r['next_seq'] - 1}")
              for r in waiting]
    print(_table(table))
    return EXIT_OK


# --- demo -------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(orders=args.orders, timeout=args.timeout, mesh=args.mesh, seeds=args.seed,
                    interfaces=args.interface, verbose=args.verbose, drop=args.drop)


# --- config -----------------------------------------------------------------------------


def _cmd_config(args: argparse.Namespace) -> int:
    current = Config.load()  # raises ConfigError (exit 2) on a bad MESHMQ_* variable
    settings = []
    for name, variable, default, help_text in Config.describe():
        value = getattr(current, name)
        settings.append((name, variable, default, value, help_text.replace("``", "'")))
    if args.json:
        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v if v is None or isinstance(v, (int, float, str)) else str(v)

        print(json.dumps([{"name": n, "variable": var, "default": plain(d), "value": plain(v), "help": h}
                          for n, var, d, v, h in settings], indent=2))
        return EXIT_OK
    width = max(len(var) for _, var, _, _, _ in settings)
    for name, variable, default, value, help_text in settings:
        line = f"{variable.ljust(width)}  default: {_config_value(default)}"
        if value != default:
            line += f"  (set: {_config_value(value)})"
        print(line)
        print(f"{' ' * width}  {help_text}")
    return EXIT_OK


def _config_value(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, tuple):
        return ",".join(value) or "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

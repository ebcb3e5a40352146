"""`toktra-agent status`: what the running agent says about itself.

In: the agent's own metrics endpoint. Out: one screen for an operator, and
an exit code: 0 all stages up, 1 running but degraded, 3 not running (or
its metrics endpoint cannot be reached).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

from agent.config import Config

STAGES = ("collector", "classifier", "shipper")
EXIT_DEGRADED = 1
EXIT_NOT_RUNNING = 3

Samples = dict[str, list[tuple[dict[str, str], float]]]


def metrics_url(config: Config) -> str:
    host = config.metrics_address
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.metrics_port}/metrics"


def fetch(url: str, timeout: float = 3.0) -> Samples:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        text = answer.read().decode()
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def total(samples: Samples, name: str, **match: str) -> float:
    return sum(
        value
        for labels, value in samples.get(name, [])
        if all(labels.get(k) == v for k, v in match.items())
    )


def _probe_mode(labels: dict[str, str]) -> str:
    chosen, configured = labels["send_hook"], labels.get("configured", "auto")
    if configured in ("auto", chosen):
        return chosen
    return f"{chosen} (send_hook = {configured} did not load; see doctor)"


def foreign_pids(samples: Samples, proc: str = "/proc") -> list[str]:
    """Stages whose reported pid is not a process of that stage here."""
    from agent.supervisor import COMM, SUPERVISOR_COMM

    bad = []
    for labels, value in samples.get("toktra_stage_pid", []):
        stage = labels.get("stage", "")
        try:
            with open(f"{proc}/{int(value)}/comm") as f:
                comm = f.read().strip()
        except (OSError, ValueError):
            comm = ""
        # The supervisor is the toktra-agent command itself.
        if comm != COMM.get(stage, SUPERVISOR_COMM):
            bad.append(f"{stage}={int(value)}")
    if not samples.get("toktra_stage_pid"):
        bad.append("no stage pids at all")
    return bad


def show(config: Config, out: TextIO) -> int:
    url = metrics_url(config)
    try:
        samples = fetch(url)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        out.write(
            f"toktra-agent is not running, or {url} cannot be reached: {reason}\n"
        )
        return EXIT_NOT_RUNNING
    if strangers := foreign_pids(samples):
        out.write(
            f"{url} answers, but not for this agent: the pids it names are not "
            f"agent processes ({', '.join(strangers)}). Another program may hold "
            "the metrics port while the metrics stage restarts.\n"
        )
        return EXIT_DEGRADED
    up = {s: total(samples, "toktra_stage_up", stage=s) == 1 for s in STAGES}
    failing = {s: total(samples, "toktra_stage_failing", stage=s) == 1 for s in STAGES}
    capture_degraded = total(samples, "toktra_capture_degraded") == 1
    degraded = not all(up.values()) or any(failing.values()) or capture_degraded
    out.write(f"toktra-agent: {'degraded' if degraded else 'running'} ({url})\n\n")
    out.write(f"{'stage':<12}{'state':<10}{'pid':>8}{'restarts':>10}\n")
    for stage in (*STAGES, "metrics"):
        state = "up" if stage == "metrics" or up.get(stage) else "down"  # it answered
        if failing.get(stage):
            state = "failing"
        pid = int(total(samples, "toktra_stage_pid", stage=stage))
        restarts = int(total(samples, "toktra_stage_restarts_total", stage=stage))
        out.write(f"{stage:<12}{state:<10}{pid or '-':>8}{restarts:>10}\n")
    modes = [
        _probe_mode(labels) for labels, v in samples.get("toktra_probe_mode", []) if v
    ]
    out.write("\n")
    out.write(f"probe mode          {', '.join(modes) or 'unknown'}\n")
    if capture_degraded:
        out.write(
            "capture             DEGRADED: no BPF capture; connections and "
            "bytes come from sock_diag polling, without SNI (the collector's "
            "log says why)\n"
        )
    out.write(f"libssl attached     {int(total(samples, 'toktra_libssl_attached'))}\n")
    out.write(
        f"active connections  {int(total(samples, 'toktra_active_connections'))}\n"
    )
    for label, name in (
        ("events received", "toktra_events_received_total"),
        ("events sent", "toktra_events_sent_total"),
        ("events buffered", "toktra_buffered_events"),
        ("send errors", "toktra_send_errors_total"),
    ):
        out.write(f"{label:<20}{int(total(samples, name))}\n")
    dropped = defaultdict(float)
    for labels, value in samples.get("toktra_events_dropped_total", []):
        if value:
            dropped[f"{labels.get('stage')}/{labels.get('reason')}"] += value
    detail = ", ".join(f"{k}={int(v)}" for k, v in sorted(dropped.items()))
    out.write(f"{'events dropped':<20}{int(sum(dropped.values()))}")
    out.write(f" ({detail})\n" if detail else "\n")
    breaker = total(samples, "toktra_circuit_breaker_open")
    out.write(f"{'circuit breaker':<20}{'open' if breaker else 'closed'}\n")
    return EXIT_DEGRADED if degraded else 0

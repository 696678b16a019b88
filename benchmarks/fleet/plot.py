"""The fleet run as a PNG: connects and messages per second around the broker restart, and
the CPU, so a reader can tell the backoff's curve from a saturated machine. Needs
matplotlib (the `[fleet]` extra); nothing else in the project imports it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def render(result: dict, path: Path) -> None:
    series = result["series"]
    t = series["t_from_broker_stop_s"]
    marks = result["marks_from_broker_stop_s"]
    n = result["scenario"]["n"]
    # The model's mean attempt curve starts at the loss of the connections (the stop).
    model_curve = result["model"]["mean_attempts_per_s_from_loss"][:int(t[-1]) + 1]

    fig, (connects, messages, cpu) = plt.subplots(3, 1, figsize=(10, 9), sharex=True,
                                                  gridspec_kw={"height_ratios": [3, 2, 1.2]})
    connects.step(t, series["connect_attempts_per_s"], where="post", label="connect attempts/s (agents' logs)")
    connects.step(t, series["broker_connects_per_s"], where="post", label="sessions accepted/s (mosquitto log)")
    connects.step([i + 0.0 for i in range(len(model_curve))], model_curve, where="post", linestyle="--",
                  label=f"model: mean attempts/s for N = {n}")
    clients = connects.twinx()
    clients.plot(t, series["broker_clients_connected"], color="grey", linewidth=1, label="clients connected ($SYS)")
    clients.set_ylabel("clients connected")
    connects.set_ylabel("per second")
    back = result["all_back_after_restart_s"]["agent_logs"]
    connects.set_title(f"{n} agents, broker stopped for {result['outage_s']:.1f} s: all back "
                       f"{back} s after the restart; events lost: {result['events']['lost']}")
    handles = connects.get_legend_handles_labels()[0] + clients.get_legend_handles_labels()[0]
    connects.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)

    messages.step(t, series["observer_messages_per_s"], where="post", label="messages/s at the observer")
    messages.step(t, series["observer_events_per_s"], where="post", label="of which events")
    messages.step(t, series["broker_publish_received_per_s"], where="post", linestyle=":",
                  label="PUBLISH received/s ($SYS)")
    messages.set_ylabel("per second")
    messages.legend(loc="upper right", fontsize=8)

    cpu.plot(t, series["cpu_busy_pct"], color="tab:red", label="machine (all processes)")
    cpu.plot(t, series["fleet_cpu_pct"], color="tab:purple", label="the fleet: agents, fakes, broker")
    cpu.set_ylim(0, 105)
    cpu.set_ylabel("CPU % of\nboth cores")
    cpu.legend(loc="upper right", fontsize=8)
    cpu.set_xlabel("seconds from the broker stop")

    for axis in (connects, messages, cpu):
        for name, style in (("broker_stop", "-"), ("broker_up", "-"), ("swap_before", ":"), ("swap_during", ":"),
                            ("restore", ":")):
            if name in marks:
                axis.axvline(marks[name], color="black", linestyle=style, linewidth=0.8)
    labels = (("swap_before", "swaps"), ("broker_stop", "broker stop"), ("swap_during", "swaps (broker down)"),
              ("broker_up", "broker start"), ("restore", "cards back"))
    for row, (name, label) in enumerate(labels):  # marks a second apart: labels on alternate heights
        if name in marks:
            connects.annotate(label, (marks[name], 0.98 - 0.35 * (row % 2)), xycoords=("data", "axes fraction"),
                              fontsize=7, rotation=90, va="top", ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)

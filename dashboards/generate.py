#!/usr/bin/env python3
"""Writes Tiandi's Grafana dashboards (dashboards/grafana/*.json) from one description.

Built with grafana-foundation-sdk's typed builders (the Grafana 11.6 schema: a field or value
the schema does not have cannot be written), pinned in dashboards/requirements.txt:

    python3 -m venv /tmp/gv && /tmp/gv/bin/pip install -r dashboards/requirements.txt
    /tmp/gv/bin/python dashboards/generate.py          # rewrite dashboards/grafana/
    /tmp/gv/bin/python dashboards/generate.py --check  # exit 1 if the JSON differs

Every query filters by the dashboard's variables ($province, $site, $job) the same way, uses
only tiandi_* series (and process_*/up of the same jobs), and is run against a real Prometheus
by tests/tests/dashboards.rs: each must return data there.
"""

import argparse
import json
import pathlib
import sys

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as pq
from grafana_foundation_sdk.builders import stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT = pathlib.Path(__file__).resolve().parent / "grafana"
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
P = 'province=~"$province"'


def q(expr, legend=None, instant=False, ref="A", fmt_table=False):
    t = pq.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend:
        t = t.legend_format(legend)
    if instant:
        t = t.instant()
    if fmt_table:
        t = t.format(PromQueryFormat.TABLE)
    return t


def refs(targets):
    return [
        t.ref_id(chr(ord("A") + i)) if isinstance(t, pq.Dataquery) else t
        for i, t in enumerate(targets)
    ]


def ts(title, targets, unit="short", w=12, h=8, desc=None, stack=False, lo=None, hi=None):
    p = (
        timeseries.Panel()
        .title(title)
        .datasource(DS)
        .unit(unit)
        .span(w)
        .height(h)
        .line_width(1)
        .fill_opacity(20 if stack else 10)
    )
    if desc:
        p = p.description(desc)
    if stack:
        p = p.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
    if lo is not None:
        p = p.min(lo)
    if hi is not None:
        p = p.max(hi)
    for t in refs(targets):
        p = p.with_target(t)
    return p


def st(title, targets, unit="short", w=4, h=4, desc=None, red_above=None, text=False):
    p = (
        stat.Panel()
        .title(title)
        .datasource(DS)
        .unit(unit)
        .span(w)
        .height(h)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .graph_mode(cm.BigValueGraphMode.NONE)
    )
    if text:
        p = p.text_mode(cm.BigValueTextMode.NAME)
    if desc:
        p = p.description(desc)
    if red_above is not None:
        p = p.thresholds(
            db.ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps(
                [
                    dm.Threshold(value=None, color="green"),
                    dm.Threshold(value=red_above, color="red"),
                ]
            )
        )
    for t in refs(targets):
        p = p.with_target(t)
    return p


def tb(title, targets, w=12, h=8, desc=None, hide=(), rename=None, unit=None):
    """A table of instant queries, merged on their common labels."""
    p = table.Panel().title(title).datasource(DS).span(w).height(h)
    if unit:
        p = p.unit(unit)
    if desc:
        p = p.description(desc)
    targets = refs(targets)
    for t in targets:
        p = p.with_target(t.instant().format(PromQueryFormat.TABLE))
    if len(targets) > 1:
        p = p.with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
    exclude = {"Time": True, "__name__": True, "job": True, "instance": True}
    exclude.update({k: True for k in hide})
    p = p.with_transformation(
        dm.DataTransformerConfig(
            id_val="organize",
            options={"excludeByName": exclude, "renameByName": rename or {}},
        )
    )
    return p


def variables(d, site=False, job="tiandi-controller"):
    d = d.with_variable(
        db.DatasourceVariable("datasource").label("Data source").type("prometheus")
    )
    d = d.with_variable(
        db.QueryVariable("job")
        .label("Job")
        .query("label_values(tiandi_build_info, job)")
        .datasource(DS)
        .refresh(dm.VariableRefresh.ON_DASHBOARD_LOAD)
        .include_all(True)
        .all_value(".*")
        .multi(True)
        .current(dm.VariableOption(selected=True, text="All", value="$__all"))
    )
    d = d.with_variable(
        db.QueryVariable("province")
        .label("Province")
        .query("label_values(tiandi_site_up, province)")
        .datasource(DS)
        .refresh(dm.VariableRefresh.ON_DASHBOARD_LOAD)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .include_all(True)
        .all_value(".*")
        .multi(True)
        .current(dm.VariableOption(selected=True, text="All", value="$__all"))
    )
    if site:
        d = d.with_variable(
            db.QueryVariable("site")
            .label("Site")
            .query(f"label_values(tiandi_site_up{{{P}}}, site)")
            .datasource(DS)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
        )
    return d


def dash(uid, title, desc, rows, site=False):
    d = (
        db.Dashboard(title)
        .uid(uid)
        .description(desc)
        .tags(["tiandi"])
        .editable()
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
        .link(
            db.DashboardLink("Tiandi")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags(["tiandi"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )
    d = variables(d, site=site)
    # Open rows: the row header, then its panels on the dashboard's own grid (Grafana nests
    # panels inside a row only when it is collapsed). Panel IDs are unique per dashboard.
    n = 0
    for name, panels in rows:
        n += 1
        d = d.with_row(db.Row(name).collapsed(False).id(n))
        for p in panels:
            n += 1
            d = d.with_panel(p.id(n))
    return d


S = 'site="$site"'

# tiandi_site_path_state's values, as the console shows them.
PATH_STATES = dm.ValueMap(
    options={
        "2": dm.ValueMappingResult(text="up", color="green", index=0),
        "1": dm.ValueMappingResult(text="suspect", color="yellow", index=1),
        "0": dm.ValueMappingResult(text="down", color="red", index=2),
    }
)


def path_states():
    """Each path of each dual-homed site, down first, its state in colour."""
    return (
        tb(
            "Dual-homed sites: paths",
            [q(f"sort(tiandi_site_path_state{{{P}}})")],
            w=12,
            h=10,
            rename={"Value": "state"},
            desc="Each path (terrestrial line, satellite link) of each dual-homed site, as the site "
            "sees it. A site with one path up has the path-redundancy-lost alarm.",
        )
        .mappings([PATH_STATES])
        .override_by_name(
            "state",
            [
                dm.DynamicConfigValue(
                    id_val="custom.cellOptions", value={"type": "color-background"}
                )
            ],
        )
    )


# A device's checks: 1 the device answers (SNMP, or its reachability check), 0 it does not.
CHECK_STATES = dm.ValueMap(
    options={
        "1": dm.ValueMappingResult(text="answers", color="green", index=0),
        "0": dm.ValueMappingResult(text="no answer", color="red", index=1),
    }
)


def device_checks():
    """Each SNMP device of the site: its poll, and its reachability check where it has one."""
    return (
        statetimeline.Panel()
        .title("Devices: SNMP and reachability")
        .datasource(DS)
        .span(12)
        .height(8)
        .description(
            "Each SNMP device: whether it answered its last poll usably (snmp) and, for a device "
            "with a reachability check, whether its address answered that (ICMP echo or TCP "
            "connect). Answering the check but not SNMP: the device is up, its SNMP agent or "
            "community is not; answering neither: the device-unreachable alarm."
        )
        .mappings([CHECK_STATES])
        .show_value(cm.VisibilityMode.NEVER)
        .with_target(
            q(
                f'label_replace(tiandi_site_device_up{{{S}}}, "check", "snmp", "device", ".*")'
                f' or label_replace(tiandi_site_device_reachable{{{S}}}, "check", "reachability", "device", ".*")',
                "{{device}} {{check}}",
            )
        )
    )


def fleet():
    return dash(
        "tiandi-fleet",
        "Tiandi / Fleet overview",
        "Sites up, down and degraded by province, the alarms of the fleet, SNMP devices and their events, and dual-homed sites' paths.",
        [
            (
                "Sites",
                [
                    st("Sites", [q(f"count(tiandi_site_up{{{P}}})")]),
                    st(
                        "Down",
                        [q(f"sum(1 - tiandi_site_up{{{P}}})")],
                        red_above=1,
                        desc="Sites that sent nothing for three report intervals.",
                    ),
                    st(
                        "Not up",
                        [q(f'count(tiandi_site_status{{{P},status!="up"}}) or vector(0)')],
                        red_above=1,
                        desc="Down, degraded, disk full, in rain fade or on battery.",
                    ),
                    st(
                        "Active alarms",
                        [q(f"count(tiandi_site_alarm{{{P}}}) or vector(0)")],
                        red_above=1,
                    ),
                    st(
                        "Reports / s",
                        [q('sum(rate(tiandi_reports_total{job=~"$job"}[$__rate_interval]))')],
                        unit="reqps",
                    ),
                    st(
                        "Connected",
                        [q(f"sum(tiandi_site_connected{{{P}}})")],
                        desc="Agents with an open QUIC connection.",
                    ),
                    ts(
                        "Sites by status",
                        [q(f"count by (status) (tiandi_site_status{{{P}}})", "{{status}}")],
                        w=12,
                        stack=True,
                    ),
                    ts(
                        "Alarms raised per hour",
                        [
                            q(
                                'sum by (alarm) (increase(tiandi_alarm_events_total{job=~"$job",state="raised"}[1h]))',
                                "{{alarm}}",
                            )
                        ],
                        w=12,
                    ),
                ],
            ),
            (
                "Provinces",
                [
                    tb(
                        "Provinces",
                        [
                            q(f"count by (province) (tiandi_site_up{{{P}}})"),
                            q(f"sum by (province) (1 - tiandi_site_up{{{P}}})"),
                            q(f'count by (province) (tiandi_site_status{{{P},status!="up"}})'),
                            q(f"count by (province) (tiandi_site_alarm{{{P}}})"),
                        ],
                        w=12,
                        h=12,
                        rename={
                            "Value #A": "sites",
                            "Value #B": "down",
                            "Value #C": "not up",
                            "Value #D": "alarms",
                        },
                    ),
                    tb(
                        "Active alarms",
                        [q(f"tiandi_site_alarm{{{P}}}")],
                        w=12,
                        h=12,
                        hide=["Value"],
                    ),
                    ts(
                        "Agent versions",
                        [q(f"count by (agent_version) (tiandi_site_info{{{P}}})", "{{agent_version}}")],
                        w=12,
                        desc="Sites by the agent version they run: a rollout, as it happens.",
                        stack=True,
                    ),
                    ts(
                        "Report delay (p50, p99)",
                        [
                            q(
                                'histogram_quantile(0.5, sum by (le) (rate(tiandi_report_delay_seconds_bucket{job=~"$job"}[$__rate_interval])))',
                                "p50",
                            ),
                            q(
                                'histogram_quantile(0.99, sum by (le) (rate(tiandi_report_delay_seconds_bucket{job=~"$job"}[$__rate_interval])))',
                                "p99",
                            ),
                        ],
                        unit="s",
                        w=12,
                        desc="Sample time at the site to stored at the controller (backlog after an outage counts whole).",
                    ),
                ],
            ),
            (
                "Devices",
                [
                    st(
                        "Unreachable",
                        [q(f"count(tiandi_site_device_reachable{{{P}}} == 0) or vector(0)")],
                        w=6,
                        red_above=1,
                        desc="Devices whose address did not answer their reachability check (ICMP "
                        "echo, TCP connect) at the last poll.",
                    ),
                    st(
                        "Not answering SNMP",
                        [q(f"count(tiandi_site_device_up{{{P}}} == 0) or vector(0)")],
                        w=6,
                        red_above=1,
                    ),
                    st(
                        "Objects not answered",
                        [q(f"sum(tiandi_site_device_problems{{{P}}})")],
                        w=6,
                        desc="Objects of the devices' SNMP profiles they did not answer properly at the "
                        "last poll (no such object, wrong type, out of range, an error): a firmware "
                        "the profile does not fit, most often.",
                    ),
                    st(
                        "Critical device events (1 h)",
                        [q('sum(increase(tiandi_device_events_total{job=~"$job",severity="critical"}[1h]))')],
                        w=6,
                        desc="Critical traps and informs of the sites' devices in the last hour.",
                    ),
                    ts(
                        "Device events per minute, by severity",
                        [
                            q(
                                'sum by (severity) (rate(tiandi_device_events_total{job=~"$job"}[$__rate_interval])) * 60',
                                "{{severity}}",
                            )
                        ],
                        w=8,
                        h=10,
                        stack=True,
                        desc="Traps and informs of all the sites' devices (link-down, on-battery, …); a "
                        "flood the agent summarised counts whole. The province filter does not apply: "
                        "the counter is the fleet's. The console's site page lists each site's events.",
                    ),
                    tb(
                        "Unreachable devices",
                        [q(f"tiandi_site_device_reachable{{{P}}} == 0")],
                        w=8,
                        h=10,
                        hide=["Value"],
                    ),
                    tb(
                        "Devices with objects not answered",
                        [q(f"sort_desc(tiandi_site_device_problems{{{P}}} > 0)")],
                        w=8,
                        h=10,
                        rename={"Value": "objects"},
                    ),
                ],
            ),
            (
                "Dual-homed sites",
                [
                    path_states(),
                    ts(
                        "Path switches per minute, by class",
                        [
                            q(
                                'sum by (class) (rate(tiandi_path_switches_total{job=~"$job"}[5m])) * 60',
                                "{{class}}",
                            )
                        ],
                        w=12,
                        h=10,
                        desc="Dual-homed sites moving a class of traffic to another path: failover when a "
                        "path goes down, switch-back after the hold, a window opening or closing.",
                    ),
                ],
            ),
        ],
    )


def site():
    rate = "$__rate_interval"
    return dash(
        "tiandi-site",
        "Tiandi / Site",
        "One site: host, link, satellite modem, UPS, SNMP devices, interfaces and alarms.",
        [
            (
                "Status",
                [
                    st("Status", [q(f"tiandi_site_status{{{S}}}", "{{status}}")], text=True),
                    st("Agent", [q(f"tiandi_site_info{{{S}}}", "{{agent_version}}")], text=True),
                    st(
                        "Last report",
                        [q(f"tiandi_site_last_report_age_seconds{{{S}}}")],
                        unit="s",
                        red_above=60,
                    ),
                    st("Uptime", [q(f"tiandi_site_uptime_seconds{{{S}}}")], unit="s"),
                    st("Round trip", [q(f"tiandi_site_link_rtt_seconds{{{S}}}")], unit="s"),
                    st(
                        "ModCod",
                        [q(f"tiandi_site_modem_info{{{S}}}", "{{modcod}}")],
                        text=True,
                    ),
                    tb("Active alarms", [q(f"tiandi_site_alarm{{{S}}}")], w=12, h=5, hide=["Value"]),
                    tb(
                        "SNMP devices",
                        [q(f"tiandi_site_device_up{{{S}}}")],
                        w=12,
                        h=5,
                        rename={"Value": "answering"},
                    ),
                ],
            ),
            (
                "Host",
                [
                    ts(
                        "CPU, memory, fullest disk",
                        [
                            q(f"tiandi_site_cpu_ratio{{{S}}}", "cpu"),
                            q(f"tiandi_site_memory_used_ratio{{{S}}}", "memory"),
                            q(f"tiandi_site_disk_used_ratio_max{{{S}}}", "disk"),
                        ],
                        unit="percentunit",
                        w=8,
                        lo=0,
                        hi=1,
                    ),
                    ts("Load (1 min)", [q(f"tiandi_site_load1{{{S}}}", "load1")], w=8),
                    ts(
                        "Filesystems",
                        [q(f"tiandi_site_filesystem_used_ratio{{{S}}}", "{{mount}}")],
                        unit="percentunit",
                        w=8,
                        lo=0,
                        hi=1,
                    ),
                ],
            ),
            (
                "Link",
                [
                    ts("Round-trip time", [q(f"tiandi_site_link_rtt_seconds{{{S}}}", "rtt")], unit="s", w=8),
                    ts(
                        "Packet loss",
                        [
                            q(
                                f"rate(tiandi_site_link_packets_lost_total{{{S}}}[{rate}]) / rate(tiandi_site_link_packets_sent_total{{{S}}}[{rate}])",
                                "lost",
                            )
                        ],
                        unit="percentunit",
                        w=8,
                        desc="QUIC packets the agent declared lost, of those it sent.",
                    ),
                    ts(
                        "Link traffic",
                        [
                            q(f"rate(tiandi_site_link_transmit_bytes_total{{{S}}}[{rate}]) * 8", "from site"),
                            q(f"rate(tiandi_site_link_receive_bytes_total{{{S}}}[{rate}]) * 8", "to site"),
                        ],
                        unit="bps",
                        w=8,
                    ),
                ],
            ),
            (
                "Satellite modem and UPS",
                [
                    ts(
                        "Es/No",
                        [q(f"tiandi_site_modem_esno_db{{{S}}}", "Es/No")],
                        unit="dB",
                        w=8,
                        desc="Below the rain-fade threshold ([thresholds] rain_fade_esno_db) the site is in rain fade.",
                    ),
                    ts(
                        "Levels",
                        [
                            q(f"tiandi_site_modem_rx_level_dbm{{{S}}}", "receive level"),
                            q(f"tiandi_site_modem_tx_power_dbm{{{S}}}", "transmit power"),
                        ],
                        unit="dBm",
                        w=8,
                    ),
                    ts(
                        "Carrier rates",
                        [
                            q(f"tiandi_site_modem_receive_rate_bytes_per_second{{{S}}} * 8", "to site"),
                            q(f"tiandi_site_modem_transmit_rate_bytes_per_second{{{S}}} * 8", "from site"),
                        ],
                        unit="bps",
                        w=8,
                    ),
                    ts(
                        "UPS charge",
                        [q(f"tiandi_site_ups_charge_ratio{{{S}}}", "charge")],
                        unit="percentunit",
                        w=8,
                        lo=0,
                        hi=1,
                    ),
                    ts("UPS runtime left", [q(f"tiandi_site_ups_runtime_seconds{{{S}}}", "runtime")], unit="s", w=8),
                    ts("On battery", [q(f"tiandi_site_ups_on_battery{{{S}}}", "on battery")], w=8, lo=0, hi=1),
                ],
            ),
            (
                "Devices",
                [
                    device_checks(),
                    ts(
                        "Objects not answered, per device",
                        [q(f"tiandi_site_device_problems{{{S}}}", "{{device}}")],
                        w=12,
                        lo=0,
                        desc="Objects of the device's SNMP profile it did not answer properly at the last "
                        "poll (no such object or instance, wrong type, out of range, an error status, a "
                        "table cut short). The console's device card names them; its events (traps) are "
                        "there too (the fleet dashboard counts them by severity).",
                    ),
                ],
            ),
            (
                "Interfaces and transfers",
                [
                    ts(
                        "Host interfaces",
                        [
                            q(f"rate(tiandi_site_network_receive_bytes_total{{{S}}}[{rate}]) * 8", "{{interface}} in"),
                            q(f"rate(tiandi_site_network_transmit_bytes_total{{{S}}}[{rate}]) * 8", "{{interface}} out"),
                        ],
                        unit="bps",
                        w=8,
                    ),
                    ts(
                        "Device ports",
                        [
                            q(
                                f"rate(tiandi_site_device_interface_receive_bytes_total{{{S}}}[{rate}]) * 8",
                                "{{device}} {{interface}} in",
                            ),
                            q(
                                f"rate(tiandi_site_device_interface_transmit_bytes_total{{{S}}}[{rate}]) * 8",
                                "{{device}} {{interface}} out",
                            ),
                        ],
                        unit="bps",
                        w=8,
                    ),
                    ts(
                        "Transfers to the site: bytes left",
                        [q('tiandi_transfer_remaining_bytes{dest="$site"}', "left")],
                        unit="bytes",
                        w=8,
                    ),
                ],
            ),
        ],
        site=True,
    )


def links():
    rate = "$__rate_interval"
    return dash(
        "tiandi-links",
        "Tiandi / Link quality",
        "The fleet's links: the worst sites by round trip, loss and Es/No, and rain-fade episodes.",
        [
            (
                "Worst sites now",
                [
                    tb(
                        "Longest round trip",
                        [q(f"topk(15, tiandi_site_link_rtt_seconds{{{P}}})")],
                        w=8,
                        h=10,
                        unit="s",
                        rename={"Value": "rtt"},
                    ),
                    tb(
                        "Most packet loss (5 min)",
                        [q(f"topk(15, tiandi:site_link_loss:ratio_rate5m{{{P}}})")],
                        w=8,
                        h=10,
                        unit="percentunit",
                        rename={"Value": "loss"},
                    ),
                    tb(
                        "Lowest Es/No",
                        [q(f"bottomk(15, tiandi_site_modem_esno_db{{{P}}})")],
                        w=8,
                        h=10,
                        unit="dB",
                        rename={"Value": "Es/No"},
                    ),
                ],
            ),
            (
                "Across the fleet",
                [
                    ts(
                        "Round trip (median, 95th percentile of sites)",
                        [
                            q(f"quantile(0.5, tiandi_site_link_rtt_seconds{{{P}}})", "median"),
                            q(f"quantile(0.95, tiandi_site_link_rtt_seconds{{{P}}})", "p95"),
                        ],
                        unit="s",
                        w=8,
                    ),
                    ts(
                        "Es/No (median, 10th percentile of sites)",
                        [
                            q(f"quantile(0.5, tiandi_site_modem_esno_db{{{P}}})", "median"),
                            q(f"quantile(0.1, tiandi_site_modem_esno_db{{{P}}})", "p10"),
                        ],
                        unit="dB",
                        w=8,
                    ),
                    ts(
                        "Sites in rain fade, by province",
                        [
                            q(
                                f'count by (province) (tiandi_site_alarm{{{P},alarm="rain-fade"}})',
                                "{{province}}",
                            )
                        ],
                        w=8,
                        stack=True,
                    ),
                    tb(
                        "Rain-fade episodes in the time range",
                        [
                            q(
                                f'sort_desc(sum by (site, province) (increase(tiandi_site_alarms_raised_total{{{P},alarm="rain-fade"}}[$__range])) > 0)'
                            )
                        ],
                        w=12,
                        h=10,
                        rename={"Value": "episodes"},
                    ),
                    ts(
                        "Loss across the fleet (mean of sites)",
                        [q(f"avg(tiandi:site_link_loss:ratio_rate5m{{{P}}})", "loss")],
                        unit="percentunit",
                        w=12,
                        h=10,
                    ),
                ],
            ),
        ],
    )


def transfers():
    rate = "$__rate_interval"
    return dash(
        "tiandi-transfers",
        "Tiandi / Transfers",
        "Store-and-forward transfers: the queue, what each destination has left, rates and ETAs.",
        [
            (
                "Queue",
                [
                    st(
                        "Transfers by state",
                        [q('tiandi_transfers{job=~"$job"}', "{{state}}")],
                        w=12,
                    ),
                    st(
                        "Sending now",
                        [q('sum(tiandi_transfer_rate_bytes_per_second{job=~"$job"}) * 8')],
                        unit="bps",
                        w=6,
                    ),
                    st(
                        "Bytes left",
                        [q('sum(tiandi_transfer_remaining_bytes{job=~"$job"})')],
                        unit="bytes",
                        w=6,
                    ),
                    tb(
                        "Destinations",
                        [
                            q('tiandi_transfer_remaining_bytes{job=~"$job"}'),
                            q('tiandi_transfer_rate_bytes_per_second{job=~"$job"} * 8'),
                            q(
                                'tiandi_transfer_remaining_bytes{job=~"$job"} / (tiandi_transfer_rate_bytes_per_second{job=~"$job"} > 0)'
                            ),
                        ],
                        w=24,
                        h=10,
                        rename={"Value #A": "bytes left", "Value #B": "rate (bit/s)", "Value #C": "ETA (s)"},
                    ),
                ],
            ),
            (
                "Over time",
                [
                    ts(
                        "Transfers by state",
                        [q('tiandi_transfers{job=~"$job"}', "{{state}}")],
                        w=8,
                    ),
                    ts(
                        "Rate to destinations (top 10)",
                        [q('topk(10, tiandi_transfer_rate_bytes_per_second{job=~"$job"}) * 8', "{{dest}}")],
                        unit="bps",
                        w=8,
                    ),
                    ts(
                        "Controller's QUIC traffic",
                        [
                            q(
                                f'sum by (direction) (rate(tiandi_quic_udp_bytes_total{{job=~"$job"}}[{rate}])) * 8',
                                "{{direction}}",
                            )
                        ],
                        unit="bps",
                        w=8,
                        desc="All agent connections: reports, transfers and backups.",
                    ),
                ],
            ),
        ],
    )


def conferences():
    rate = "$__rate_interval"
    return dash(
        "tiandi-conferences",
        "Tiandi / Conferences",
        "Conference relays: rooms, participants, renditions, and what the links drop.",
        [
            (
                "Rooms",
                [
                    st("Conferences", [q("sum(tiandi_video_rooms)")]),
                    st("Connections", [q("sum(tiandi_video_connections)")]),
                    st(
                        "Groups dropped / s",
                        [q(f"sum(rate(tiandi_video_groups_dropped_total[{rate}]))")],
                        desc="Groups a relay reset before delivery because a newer one replaced them (a link too narrow).",
                    ),
                    st("Refused / s", [q(f"sum(rate(tiandi_video_refused_total[{rate}]))")]),
                    st(
                        "Sending",
                        [q(f"sum(rate(tiandi_video_payload_bytes_sent_total[{rate}])) * 8")],
                        unit="bps",
                        w=8,
                    ),
                    tb(
                        "Rooms",
                        [q("tiandi_video_room_participants"), q("tiandi_video_room_tracks")],
                        w=12,
                        rename={"Value #A": "participants", "Value #B": "tracks"},
                    ),
                    tb(
                        "Renditions on offer",
                        [q("tiandi_video_room_renditions")],
                        w=12,
                        rename={"Value": "tracks"},
                    ),
                ],
            ),
            (
                "Participants",
                [
                    tb(
                        "Reception",
                        [
                            q("tiandi_video_participant_receive_rate_bytes_per_second * 8"),
                            q("tiandi_video_participant_latency_seconds"),
                            q(f"increase(tiandi_video_participant_groups_lost_total[$__range])"),
                            q("tiandi_video_participant_frames_shown_ratio * 100"),
                            q("tiandi_video_participant_longest_freeze_seconds"),
                            q("tiandi_video_participant_frame_age_p99_seconds"),
                        ],
                        w=24,
                        h=10,
                        rename={
                            "Value #A": "bit/s",
                            "Value #B": "latency (s)",
                            "Value #C": "groups lost",
                            "Value #D": "frames shown (%)",
                            "Value #E": "longest freeze (s)",
                            "Value #F": "frame age p99 (s)",
                        },
                    ),
                    ts(
                        "Frames shown (% of those sent)",
                        [q("tiandi_video_participant_frames_shown_ratio * 100", "{{room}} {{site}}")],
                        unit="percent",
                        w=12,
                    ),
                    ts(
                        "Freezes (stalls of 120 ms or more)",
                        [q(f"increase(tiandi_video_participant_freezes_total[{rate}])", "{{room}} {{site}}")],
                        w=12,
                    ),
                    ts(
                        "Latency behind capture",
                        [q("tiandi_video_participant_latency_seconds", "{{room}} {{site}}")],
                        unit="s",
                        w=12,
                    ),
                    ts(
                        "Frames received / s",
                        [q(f"rate(tiandi_video_participant_frames_total[{rate}])", "{{room}} {{site}}")],
                        w=12,
                    ),
                ],
            ),
            (
                "Relays",
                [
                    ts(
                        "Groups",
                        [
                            q(f"sum by (relay) (rate(tiandi_video_groups_in_total[{rate}]))", "{{relay}} in"),
                            q(f"sum by (relay) (rate(tiandi_video_groups_sent_total[{rate}]))", "{{relay}} sent"),
                            q(f"sum by (relay) (rate(tiandi_video_groups_dropped_total[{rate}]))", "{{relay}} dropped"),
                        ],
                        w=12,
                    ),
                    ts(
                        "Repairs and bad streams",
                        [
                            q(f"sum by (relay) (rate(tiandi_video_repairs_sent_total[{rate}]))", "{{relay}} repairs"),
                            q(f"sum by (relay) (rate(tiandi_video_bad_streams_total[{rate}]))", "{{relay}} bad streams"),
                        ],
                        w=12,
                    ),
                ],
            ),
        ],
    )


def backups():
    return dash(
        "tiandi-backups",
        "Tiandi / Backups",
        "Mutual backups: each job's recovery point against its RPO, sizes, verification and restore drills.",
        [
            (
                "Jobs",
                [
                    st("Jobs", [q("count(tiandi_backup_rpo_seconds)")]),
                    st("Overdue", [q("sum(tiandi_backup_overdue)")], red_above=1),
                    st(
                        "Failed last run",
                        [q("sum(1 - tiandi_backup_last_run_ok)")],
                        desc="Jobs whose last backup, verify or drill failed (each kind counts).",
                        red_above=1,
                    ),
                    st("Stored at partners", [q("sum(tiandi_backup_partner_bytes)")], unit="bytes"),
                    st("Repositories", [q("sum(tiandi_backup_repository_bytes)")], unit="bytes"),
                    st(
                        "Worst age / RPO",
                        [q("max(tiandi_backup_age_seconds / tiandi_backup_rpo_seconds)")],
                        unit="percentunit",
                        red_above=1,
                    ),
                    tb(
                        "Jobs",
                        [
                            q("tiandi_backup_age_seconds"),
                            q("tiandi_backup_rpo_seconds"),
                            q("tiandi_backup_overdue"),
                            q("tiandi_backup_repository_bytes"),
                        ],
                        w=24,
                        rename={
                            "Value #A": "age (s)",
                            "Value #B": "RPO (s)",
                            "Value #C": "overdue",
                            "Value #D": "repository bytes",
                        },
                    ),
                    tb(
                        "Last runs (backup, verify, drill)",
                        [q("tiandi_backup_last_run_ok")],
                        w=12,
                        rename={"Value": "ok"},
                    ),
                    ts(
                        "Age against RPO",
                        [q("tiandi_backup_age_seconds / tiandi_backup_rpo_seconds", "{{site}} {{backup_job}}")],
                        unit="percentunit",
                        w=12,
                        desc="Above 100 %: the newest good backup at the partner is older than the job allows.",
                    ),
                    ts(
                        "Sizes",
                        [
                            q("tiandi_backup_repository_bytes", "{{site}} {{backup_job}} repository"),
                            q("tiandi_backup_partner_bytes", "{{site}} {{backup_job}} at partner"),
                        ],
                        unit="bytes",
                        w=12,
                    ),
                    ts(
                        "Quota used",
                        [q("tiandi_backup_quota_used_ratio", "{{site}} {{backup_job}}")],
                        unit="percentunit",
                        w=12,
                        lo=0,
                        hi=1,
                    ),
                ],
            ),
        ],
    )


def controller():
    rate = "$__rate_interval"
    J = 'job=~"$job"'
    return dash(
        "tiandi-controller",
        "Tiandi / Controller",
        "The controller's own health: ingest, connections, admission, store, process, replication.",
        [
            (
                "Service",
                [
                    st("Scraped", [q(f"up{{{J}}}", "{{instance}}")], desc="1 while Prometheus can scrape it."),
                    st("Version", [q(f"tiandi_build_info{{{J}}}", "{{version}}")], text=True),
                    st("Fencing epoch", [q(f"tiandi_controller_epoch{{{J}}}")]),
                    st("Standbys", [q(f"tiandi_replica_standbys{{{J}}}")]),
                    st(
                        "Replica lag",
                        [q(f"max(tiandi_replica_lag_seconds{{{J}}})")],
                        unit="s",
                        red_above=60,
                        desc="What losing this controller now would cost (the recovery point).",
                    ),
                    st("Resident memory", [q(f"process_resident_memory_bytes{{{J}}}")], unit="bytes"),
                ],
            ),
            (
                "Ingest",
                [
                    ts(
                        "Reports",
                        [
                            q(f"rate(tiandi_reports_total{{{J}}}[{rate}])", "stored"),
                            q(f"rate(tiandi_reports_duplicate_total{{{J}}}[{rate}])", "duplicates"),
                        ],
                        unit="reqps",
                        w=8,
                    ),
                    ts(
                        "Time to store a report (p99)",
                        [
                            q(
                                f"histogram_quantile(0.99, sum by (le) (rate(tiandi_ingest_seconds_bucket{{{J}}}[{rate}])))",
                                "p99",
                            )
                        ],
                        unit="s",
                        w=8,
                    ),
                    ts(
                        "Store commits",
                        [q(f"rate(tiandi_store_commits_total{{{J}}}[{rate}])", "commits")],
                        unit="ops",
                        w=8,
                    ),
                ],
            ),
            (
                "Connections",
                [
                    ts(
                        "Connections",
                        [
                            q(f"tiandi_connections{{{J}}}", "open"),
                            q(f"tiandi_connections_pending_admission{{{J}}}", "waiting for admission"),
                        ],
                        w=8,
                    ),
                    ts(
                        "Handshakes and refusals",
                        [
                            q(f"rate(tiandi_handshakes_total{{{J}}}[{rate}])", "handshakes"),
                            q(
                                f"sum by (reason) (rate(tiandi_connections_refused_total{{{J}}}[{rate}]))",
                                "refused: {{reason}}",
                            ),
                            q(f"rate(tiandi_protocol_errors_total{{{J}}}[{rate}])", "protocol errors"),
                        ],
                        unit="ops",
                        w=8,
                    ),
                    ts(
                        "Enrollments",
                        [q(f"sum by (result) (rate(tiandi_enrollments_total{{{J}}}[{rate}]))", "{{result}}")],
                        unit="ops",
                        w=8,
                    ),
                ],
            ),
            (
                "Process",
                [
                    ts(
                        "CPU",
                        [q(f"rate(process_cpu_seconds_total{{{J}}}[{rate}])", "{{instance}}")],
                        unit="percentunit",
                        w=8,
                        desc="Cores busy (1 = one core).",
                    ),
                    ts(
                        "Memory",
                        [q(f"process_resident_memory_bytes{{{J}}}", "{{instance}}")],
                        unit="bytes",
                        w=8,
                    ),
                    ts(
                        "Open files",
                        [
                            q(f"process_open_fds{{{J}}}", "open"),
                            q(f"process_max_fds{{{J}}}", "limit"),
                        ],
                        w=8,
                    ),
                    ts(
                        "Replication lag",
                        [q(f"tiandi_replica_lag_seconds{{{J}}}", "{{standby}}")],
                        unit="s",
                        w=12,
                    ),
                    ts(
                        "Replication log",
                        [q(f"rate(tiandi_replica_log_records_total{{{J}}}[{rate}])", "records")],
                        unit="ops",
                        w=12,
                    ),
                ],
            ),
        ],
    )


DASHBOARDS = {
    "fleet": fleet,
    "site": site,
    "links": links,
    "transfers": transfers,
    "conferences": conferences,
    "backups": backups,
    "controller": controller,
}


def render(build):
    enc = JSONEncoder(sort_keys=True, indent=2)
    return enc.encode(build().build()) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare, do not write")
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    a = ap.parse_args()
    stale = []
    a.out.mkdir(parents=True, exist_ok=True)
    for name, build in DASHBOARDS.items():
        text = render(build)
        json.loads(text)
        path = a.out / f"tiandi-{name}.json"
        if a.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
    if stale:
        print(
            "generate.py: these differ from what dashboards/generate.py writes (run it): "
            + ", ".join(stale),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

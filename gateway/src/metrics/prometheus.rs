//! The Prometheus text exposition of a [`Status`]
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>). A test parses it with an
//! independent parser, so a malformed line cannot slip through.

use std::fmt::Write as _;

use control::source::kubernetes::{self, KindState};

use super::{health, Status};
use crate::stats::{CounterSnapshot, CtEvent};

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A metric family's HELP and TYPE lines.
fn family(name: &str, kind: &str, help: &str, o: &mut String) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Renders the Prometheus text exposition.
pub fn prometheus(s: &Status) -> String {
    let mut o = String::new();
    for (name, help, get) in [
        (
            "portcullis_rx_packets_total",
            "Frames received, per worker and direction (ingress = received on ext).",
            (|w: &CounterSnapshot| [w.rx_ingress, w.rx_egress]) as fn(&CounterSnapshot) -> [u64; 2],
        ),
        (
            "portcullis_tx_packets_total",
            "Frames forwarded, per worker and direction.",
            |w| [w.tx_ingress, w.tx_egress],
        ),
    ] {
        family(name, "counter", help, &mut o);
        for (i, w) in s.workers.iter().enumerate() {
            let [ingress, egress] = get(w);
            let _ = writeln!(
                o,
                "{name}{{worker=\"{i}\",direction=\"ingress\"}} {ingress}"
            );
            let _ = writeln!(o, "{name}{{worker=\"{i}\",direction=\"egress\"}} {egress}");
        }
    }
    family(
        "portcullis_drops_total",
        "counter",
        "Frames dropped, per worker and reason.",
        &mut o,
    );
    for (i, w) in s.workers.iter().enumerate() {
        for (reason, n) in &w.drops {
            let _ = writeln!(
                o,
                "portcullis_drops_total{{worker=\"{i}\",reason=\"{reason}\"}} {n}"
            );
        }
    }
    for (name, help, get) in [
        (
            "portcullis_l2_forwarded_total",
            "Non-IP frames forwarded by the l2 policy.",
            (|w: &CounterSnapshot| w.l2_forwarded) as fn(&CounterSnapshot) -> u64,
        ),
        (
            "portcullis_wakeups_total",
            "Syscalls made to kick TX or the fill ring (need_wakeup).",
            |w| w.wakeups,
        ),
        (
            "portcullis_fill_starved_total",
            "Bursts that found no free frame to refill the fill rings.",
            |w| w.fill_starved,
        ),
        (
            "portcullis_idle_sleeps_total",
            "poll(2) sleeps in idle mode.",
            |w| w.idle_sleeps,
        ),
        (
            "portcullis_bursts_total",
            "Non-empty bursts processed.",
            |w| w.bursts,
        ),
    ] {
        family(name, "counter", help, &mut o);
        for (i, w) in s.workers.iter().enumerate() {
            let _ = writeln!(o, "{name}{{worker=\"{i}\"}} {}", get(w));
        }
    }
    family(
        "portcullis_busy_seconds_total",
        "counter",
        "Time spent in turns that moved frames (the work, where busy polling keeps the core at 100 %).",
        &mut o,
    );
    for (i, w) in s.workers.iter().enumerate() {
        let _ = writeln!(
            o,
            "portcullis_busy_seconds_total{{worker=\"{i}\"}} {}",
            w.busy_ns as f64 / 1e9
        );
    }
    if let Some(ct) = &s.conntrack {
        conntrack_metrics(s, ct, &mut o);
    }
    family(
        "portcullis_xsk_kernel_drops_total",
        "counter",
        "Frames the kernel could not hand to the gateway's AF_XDP sockets (XDP_STATISTICS), per socket and kind.",
        &mut o,
    );
    for k in &s.kernel {
        for (kind, v) in [
            ("rx_dropped", k.stats.rx_dropped),
            ("rx_ring_full", k.stats.rx_ring_full),
            ("rx_fill_ring_empty", k.stats.rx_fill_ring_empty_descs),
            ("rx_invalid_desc", k.stats.rx_invalid_descs),
            ("tx_invalid_desc", k.stats.tx_invalid_descs),
        ] {
            let _ = writeln!(o, "portcullis_xsk_kernel_drops_total{{worker=\"{}\",iface=\"{}\",kind=\"{kind}\"}} {v}", k.worker, label(&k.iface));
        }
    }
    family(
        "portcullis_rule_hits_total",
        "counter",
        "Frames that matched each rule, by the rule's stable id and origin (object and its rule's position in it), carried across table swaps.",
        &mut o,
    );
    for r in &s.rules {
        let _ = writeln!(
            o,
            "portcullis_rule_hits_total{{rule=\"{}\",layer=\"{}\",object=\"{}\",position=\"{}\"}} {}",
            r.id,
            serde_json::to_value(r.layer).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            label(&r.object),
            r.rule.map_or(String::new(), |p| p.to_string()),
            r.hits
        );
    }
    let p = &s.policy;
    for (name, kind, help, value) in [
        (
            "portcullis_table_generation",
            "gauge",
            "Generation of the table the workers use.",
            p.generation as f64,
        ),
        (
            "portcullis_table_rules",
            "gauge",
            "Rules in the current table.",
            p.rules as f64,
        ),
        (
            "portcullis_table_build_seconds",
            "gauge",
            "Time to build the current classifier.",
            p.build_ms / 1e3,
        ),
        (
            "portcullis_table_compile_seconds",
            "gauge",
            "Time to load and compile the current policies.",
            p.compile_ms / 1e3,
        ),
        (
            "portcullis_table_memory_bytes",
            "gauge",
            "Memory held by the current table.",
            p.memory_bytes as f64,
        ),
        (
            "portcullis_policy_reload_errors_total",
            "counter",
            "Policy reloads rejected (the last good table stayed).",
            p.reloads_failed as f64,
        ),
        (
            "portcullis_policy_reloads_total",
            "counter",
            "Policy reloads published.",
            p.reloads_ok as f64,
        ),
        (
            "portcullis_policy_rejected_objects",
            "gauge",
            "API objects left out of the table for exceeding the compile budget (limits).",
            p.rejected.len() as f64,
        ),
        (
            "portcullis_policy_healthy",
            "gauge",
            "1 when the last reload succeeded.",
            if p.last_error.is_empty() { 1.0 } else { 0.0 },
        ),
        (
            "portcullis_uptime_seconds",
            "gauge",
            "Seconds since start.",
            s.uptime_s as f64,
        ),
        (
            "portcullis_table_last_swap_timestamp_seconds",
            "gauge",
            "Unix time of the last table swap (alert when policies change but this does not).",
            p.last_publish_unix as f64,
        ),
    ] {
        family(name, kind, help, &mut o);
        let _ = writeln!(o, "{name} {value}");
    }
    family(
        "portcullis_burst_service_seconds",
        "histogram",
        "Time a worker spends on one non-empty burst, per worker.",
        &mut o,
    );
    for (i, w) in s.worker_latency.iter().enumerate() {
        for (le, n) in &w.buckets {
            let _ = writeln!(
                o,
                "portcullis_burst_service_seconds_bucket{{worker=\"{i}\",le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            o,
            "portcullis_burst_service_seconds_bucket{{worker=\"{i}\",le=\"+Inf\"}} {}",
            w.count
        );
        let _ = writeln!(
            o,
            "portcullis_burst_service_seconds_sum{{worker=\"{i}\"}} {}",
            w.sum_s
        );
        let _ = writeln!(
            o,
            "portcullis_burst_service_seconds_count{{worker=\"{i}\"}} {}",
            w.count
        );
    }
    family(
        "portcullis_build_info",
        "gauge",
        "Always 1; the labels name the version and the commit the binary was built from.",
        &mut o,
    );
    let _ = writeln!(
        o,
        "portcullis_build_info{{version=\"{}\",commit=\"{}\",build_date=\"{}\"}} 1",
        label(&s.version),
        label(&s.commit),
        label(&s.build_date)
    );
    process_metrics(&mut o);

    family(
        "portcullis_policy_event_to_swap_seconds",
        "histogram",
        "Time from a Kubernetes watch event to the swap of the table that contains it.",
        &mut o,
    );
    for (le, n) in &s.event_to_swap_buckets {
        let _ = writeln!(
            o,
            "portcullis_policy_event_to_swap_seconds_bucket{{le=\"{le}\"}} {n}"
        );
    }
    let count = s.policy.event_to_swap.count;
    let _ = writeln!(
        o,
        "portcullis_policy_event_to_swap_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        o,
        "portcullis_policy_event_to_swap_seconds_sum {}",
        s.event_to_swap_sum_s
    );
    let _ = writeln!(o, "portcullis_policy_event_to_swap_seconds_count {count}");
    family(
        "portcullis_healthy",
        "gauge",
        "1 when /healthz answers 200 (policies load, and the Kubernetes API is synced and reachable).",
        &mut o,
    );
    let _ = writeln!(o, "portcullis_healthy {}", u8::from(health(s).is_ok()));
    if let Some(k) = &s.kubernetes {
        kubernetes_metrics(k, &mut o);
    }
    o
}

fn kubernetes_metrics(k: &kubernetes::Status, o: &mut String) {
    for (name, kind, help, value) in [
        (
            "portcullis_kubernetes_synced",
            "gauge",
            "1 once every kind was listed.",
            u64::from(k.synced),
        ),
        (
            "portcullis_kubernetes_api_reachable",
            "gauge",
            "1 while the API server answers.",
            u64::from(k.api_reachable),
        ),
        (
            "portcullis_kubernetes_publishes_total",
            "counter",
            "Kubernetes snapshots compiled and swapped in.",
            k.publishes,
        ),
        (
            "portcullis_kubernetes_publish_errors_total",
            "counter",
            "Kubernetes snapshots rejected by the compiler (the last good table stayed).",
            k.publish_errors,
        ),
        (
            "portcullis_kubernetes_relevant_events_total",
            "counter",
            "Watch events that changed what the compiler reads.",
            k.relevant_events,
        ),
        (
            "portcullis_kubernetes_ignored_events_total",
            "counter",
            "Watch events that changed nothing the compiler reads (status churn, resyncs).",
            k.ignored_events,
        ),
    ] {
        family(name, kind, help, o);
        let _ = writeln!(o, "{name} {value}");
    }
    for (name, kind, help, get) in [
        (
            "portcullis_kubernetes_objects",
            "gauge",
            "Objects held, per kind (malformed ones included).",
            (|s: &kubernetes::KindStatus| s.objects as u64) as fn(&kubernetes::KindStatus) -> u64,
        ),
        (
            "portcullis_kubernetes_invalid_objects",
            "gauge",
            "Objects skipped because they do not parse, per kind.",
            |s| s.invalid as u64,
        ),
        (
            "portcullis_kubernetes_events_total",
            "counter",
            "Watch events received, per kind.",
            |s| s.events,
        ),
        (
            "portcullis_kubernetes_lists_total",
            "counter",
            "Complete lists, per kind (more than 1: relists after 410 Gone or reconnects).",
            |s| s.lists,
        ),
        (
            "portcullis_kubernetes_watch_errors_total",
            "counter",
            "List and watch errors, per kind.",
            |s| s.errors,
        ),
        (
            "portcullis_kubernetes_kind_synced",
            "gauge",
            "1 when the kind is listed (or absent: its CRD is not installed).",
            |s| u64::from(s.state != KindState::Pending),
        ),
    ] {
        family(name, kind, help, o);
        for s in &k.kinds {
            let _ = writeln!(o, "{name}{{kind=\"{}\"}} {}", label(&s.kind), get(s));
        }
    }
}

fn conntrack_metrics(s: &Status, ct: &super::ConntrackStatus, o: &mut String) {
    for (name, help, v) in [
        (
            "portcullis_conntrack_entries",
            "Flows in the connection tracker.",
            ct.entries,
        ),
        (
            "portcullis_conntrack_capacity",
            "Flows the connection tracker can hold (preallocated).",
            ct.capacity,
        ),
        (
            "portcullis_conntrack_memory_bytes",
            "Memory of the connection tracker (allocated once at start).",
            ct.memory_bytes,
        ),
    ] {
        family(name, "gauge", help, o);
        let _ = writeln!(o, "{name} {v}");
    }
    for (name, help, event) in [
        (
            "portcullis_conntrack_new_total",
            "Flows opened (a packet the table allowed).",
            CtEvent::New,
        ),
        (
            "portcullis_conntrack_established_total",
            "Packets passed as part of a tracked flow, without the classifier.",
            CtEvent::Established,
        ),
        (
            "portcullis_conntrack_related_total",
            "ICMP errors passed because they quote a tracked flow.",
            CtEvent::Related,
        ),
        (
            "portcullis_conntrack_evicted_total",
            "Unassured flows evicted to make room for new ones.",
            CtEvent::Evicted,
        ),
        (
            "portcullis_conntrack_expired_total",
            "Flows reclaimed after their timeout.",
            CtEvent::Expired,
        ),
        (
            "portcullis_conntrack_revalidated_drops_total",
            "Tracked flows the current table no longer admits: removed, their packet dropped.",
            CtEvent::RevalidatedDrop,
        ),
        (
            "portcullis_conntrack_invalid_total",
            "Packets of tracked flows their state did not accept (TCP window, RST sequence, checksum, flags); decided by the rules on their own.",
            CtEvent::Invalid,
        ),
        (
            "portcullis_conntrack_fragments_total",
            "Later fragments passed because their datagram's first fragment did.",
            CtEvent::Fragment,
        ),
        (
            "portcullis_conntrack_moved_total",
            "New flows placed by moving entries to their other bucket.",
            CtEvent::Moved,
        ),
    ] {
        family(name, "counter", help, o);
        for (i, w) in s.workers.iter().enumerate() {
            let _ = writeln!(o, "{name}{{worker=\"{i}\"}} {}", w.ct_count(event));
        }
    }
}

/// The standard `process_*` metrics (as the Prometheus client libraries export them), from
/// `/proc/self`.
fn process_metrics(o: &mut String) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which may hold spaces: it ends at the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> f64 {
        // `n` is the field's number in proc(5) (1-based, pid = 1, comm = 2, state = 3).
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (ticks, page) = crate::sys::clock_ticks_and_page_size();
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("btime ")
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(3)
                        .and_then(|v| v.parse::<f64>().ok())
                })
        })
        .unwrap_or(0.0);
    for (name, kind, help, value) in [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (field(14) + field(15)) / ticks,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            field(24) * page,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            field(23),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            boot + field(22) / ticks,
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds as f64,
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max_fds,
        ),
    ] {
        family(name, kind, help, o);
        let _ = writeln!(o, "{name} {value}");
    }
}

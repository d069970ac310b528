//! The Kubernetes source against the test API server (`testkit::apiserver`): list, watch,
//! bookmarks, `410 Gone` and relist, the API going away and coming back. Every scenario starts
//! from the objects of `configs/scenarios/nodeport-etp` served by the API, changes them the way a
//! cluster would, and asserts on the verdict the *live* table gives for real probe frames (built
//! with etherparse, parsed by the gateway's own parser), cross-checked against the linear
//! reference.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control::reload::Reloader;
use control::source::kubernetes::{Connection, KindState, KindStatus, KubeSource, Options};
use etherparse::PacketBuilder;
use gateway::config::Config;
use gateway::parse::{parse, Frame};
use policy::rule::{DenyReason, Direction, Verdict};
use serde_json::json;
use testkit::apiserver::ApiServer;

const ALLOW: Verdict = Verdict::Allow;
const POLICY: Verdict = Verdict::Deny(DenyReason::Policy);
const NO_LOCAL: Verdict = Verdict::Deny(DenyReason::NoLocalEndpoint);
const N1: &str = "10.0.0.11";
const N2: &str = "10.0.0.12";
const PARTNER: &str = "198.51.100.7";
const STRANGER: &str = "203.0.113.5";

fn scenario_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/scenarios/nodeport-etp")
}

/// A gateway's control side watching a test API server: the reloader (files: an empty
/// directory) and the Kubernetes source publishing into it.
struct Live {
    api: ApiServer,
    reloader: Arc<Mutex<Reloader>>,
    source: Option<KubeSource>,
    dir: PathBuf,
}

fn options() -> Options {
    Options {
        debounce: Duration::from_millis(20),
        settle: Duration::from_millis(2),
        max_delay: Duration::from_millis(200),
        retry_max: Duration::from_millis(400),
        probe_interval: Duration::from_millis(200),
        absent_recheck: Duration::from_millis(300),
        forbidden_grace: Duration::from_millis(1500),
    }
}

impl Live {
    /// The API server with the nodeport-etp objects in it, not yet watched.
    fn serve(tag: &str) -> Live {
        let api = ApiServer::start();
        api.set_bookmark_interval(Duration::from_millis(25));
        let mut files: Vec<_> = std::fs::read_dir(scenario_dir().join("policies"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            api.apply_yaml(&std::fs::read_to_string(f).unwrap());
        }
        let dir = std::env::temp_dir().join(format!("portcullis-k8s-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = Config::load(&scenario_dir().join("gateway.yaml")).unwrap();
        let reloader = Reloader::new(&dir, cfg.context, 1).unwrap();
        Live {
            api,
            reloader: Arc::new(Mutex::new(reloader)),
            source: None,
            dir,
        }
    }

    fn watch(&mut self) {
        let r = Arc::clone(&self.reloader);
        let source = KubeSource::start(
            Connection::Config(Box::new(self.api.kube_config())),
            options(),
            Box::new(move |snap, events| r.lock().unwrap().set_kubernetes(snap, events)),
        )
        .unwrap();
        self.source = Some(source);
    }

    fn start(tag: &str) -> Live {
        let mut live = Live::serve(tag);
        live.watch();
        assert!(
            live.source().wait_synced(
                Some(Duration::from_secs(10)),
                Duration::from_secs(60),
                &|| false,
                &|_| {}
            ),
            "first sync: {:#?}",
            live.source().status()
        );
        live
    }

    fn source(&self) -> &KubeSource {
        self.source.as_ref().unwrap()
    }

    fn generation(&self) -> u64 {
        self.reloader
            .lock()
            .unwrap()
            .publisher()
            .current()
            .generation()
    }

    /// The live table's verdict for a TCP SYN from `src` to `dst:port` arriving on the external
    /// interface, and the object that decided it.
    fn verdict(&self, src: &str, dst: &str, port: u16) -> (Verdict, String) {
        let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap().octets();
        let mut frame = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(ip(src), ip(dst), 64)
            .tcp(40000, port, 1, 64240)
            .syn()
            .write(&mut frame, &[])
            .unwrap();
        let Ok(Frame::Ip(key)) = parse(&frame, Direction::Ingress) else {
            panic!("the probe frame does not parse")
        };
        let table = self.reloader.lock().unwrap().publisher().current();
        let e = table.explain(&key);
        assert_eq!(
            table.reference_decision(&key),
            e.verdict,
            "{key}: the classifier and the reference scan disagree"
        );
        let object = e
            .steps
            .last()
            .map(|s| s.origin.object.clone())
            .unwrap_or_default();
        (e.verdict, object)
    }

    /// Waits (at most 10 s) until the live table gives `want` for the probe.
    fn expect(&self, src: &str, dst: &str, port: u16, want: Verdict, object: &str) {
        let started = Instant::now();
        loop {
            let (got, by) = self.verdict(src, dst, port);
            if got == want && by.contains(object) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{src} -> {dst}:{port}: want {want:?} by {object}, the live table says {got:?} by {by}\nsource: {:#?}\npolicy: {:#?}",
                self.source().status(),
                self.reloader.lock().unwrap().status()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A GatewayPolicy `partner-b` admitting STRANGER's network to the web NodePort, in force.
    fn admit_stranger(&self) {
        self.api.apply(gateway_policy(
            "partner-b",
            "Allow",
            "203.0.113.0/24",
            30080,
        ));
        self.expect(STRANGER, N1, 30080, ALLOW, "GatewayPolicy/partner-b");
    }

    /// The source's status of the kind whose label starts with `prefix`.
    fn kind(&self, prefix: &str) -> KindStatus {
        let status = self.source().status();
        status
            .kinds
            .into_iter()
            .find(|k| k.kind.starts_with(prefix))
            .unwrap_or_else(|| panic!("no kind {prefix}"))
    }

    fn wait(&self, what: &str, cond: impl Fn(&Live) -> bool) {
        let started = Instant::now();
        while !cond(self) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}: {:#?}",
                self.source().status()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.source = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn yaml(text: &str) -> serde_json::Value {
    serde_norway::from_str(text).unwrap()
}

fn gateway_policy(name: &str, action: &str, cidr: &str, port: u16) -> serde_json::Value {
    json!({"apiVersion": "portcullis.io/v1alpha1", "kind": "GatewayPolicy",
           "metadata": {"name": name},
           "spec": {"priority": 100, "ingress": [{"action": action, "protocol": "TCP",
                    "source": {"nets": [cidr]}, "destination": {"ports": [port]}}]}})
}

#[test]
fn the_first_table_waits_for_every_kind_and_matches_the_file_source() {
    let live = Live::start("sync");
    let status = live.source().status();
    assert!(status.synced && status.api_reachable, "{status:#?}");
    for k in &status.kinds {
        let want = if k.kind.contains("projectcalico") || k.kind.contains("kubevirt") {
            KindState::Absent
        } else {
            KindState::Synced
        };
        assert_eq!(k.state, want, "{k:?}");
    }
    let objects: usize = status.kinds.iter().map(|k| k.objects).sum();
    assert_eq!(objects, 12, "{status:#?}");
    assert_eq!(
        live.generation(),
        2,
        "files first, then one Kubernetes table"
    );
    assert_eq!(
        live.reloader.lock().unwrap().status().sources,
        vec!["files", "kubernetes"]
    );
    // The same verdicts as the file source gives for the same objects (tests/scenarios.rs).
    live.expect(PARTNER, N1, 30080, ALLOW, "Service/shop/web-cluster");
    live.expect(STRANGER, N1, 30080, POLICY, "Service/shop/web-cluster");
    live.expect(PARTNER, N1, 30090, ALLOW, "Service/shop/api-local");
    live.expect(PARTNER, N2, 30090, NO_LOCAL, "Service/shop/api-local");
}

#[test]
fn no_table_is_published_from_a_half_synced_snapshot() {
    let mut live = Live::serve("half");
    // Endpoint slices cannot be listed yet: without them every frontend would look empty.
    live.api
        .fail_lists("EndpointSlice.discovery.k8s.io", Some(500));
    live.watch();
    let synced = live.source().wait_synced(
        Some(Duration::from_millis(1500)),
        Duration::from_secs(60),
        &|| false,
        &|_| {},
    );
    assert!(!synced);
    let status = live.source().status();
    assert!(!status.synced);
    assert_eq!(status.publishes, 0);
    assert!(
        status.pending()[0].starts_with("EndpointSlice"),
        "{status:#?}"
    );
    assert_eq!(live.generation(), 1, "only the file table");
    live.api.fail_lists("EndpointSlice.discovery.k8s.io", None);
    live.wait("the first sync", |l| l.source().status().publishes == 1);
    live.expect(PARTNER, N2, 30090, NO_LOCAL, "Service/shop/api-local");
}

#[test]
fn policies_are_created_updated_and_deleted() {
    let live = Live::start("crud");
    live.expect(STRANGER, N1, 30080, POLICY, "Service/shop/web-cluster");
    let before = live.generation();

    live.admit_stranger();
    assert!(live.generation() > before);

    live.api
        .apply(gateway_policy("partner-b", "Deny", "203.0.113.0/24", 30080));
    live.expect(STRANGER, N1, 30080, POLICY, "GatewayPolicy/partner-b");
    live.expect(PARTNER, N1, 30080, ALLOW, "Service/shop/web-cluster");

    // A NetworkPolicy update moves the admitted range.
    live.api.apply(yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-from-partners, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{ipBlock: {cidr: 192.0.2.0/24}}], ports: [{port: http}]}]\n",
    ));
    live.expect(PARTNER, N1, 30080, POLICY, "Service/shop/web-cluster");
    live.expect("192.0.2.9", N1, 30080, ALLOW, "Service/shop/web-cluster");

    assert!(live
        .api
        .delete("portcullis.io/v1alpha1", "GatewayPolicy", "partner-b"));
    assert!(live.api.delete(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        "shop/web-from-partners"
    ));
    // Nothing selects the web pods any more: they admit everyone.
    live.expect(STRANGER, N1, 30080, ALLOW, "Service/shop/web-cluster");
    let status = live.reloader.lock().unwrap().status().clone();
    assert!(status.event_to_swap.count >= 5, "{status:#?}");
    assert!(status.event_to_swap.p50_ms > 0.0);
}

#[test]
fn a_pod_relabel_flips_its_selection() {
    let live = Live::start("relabel");
    live.expect(STRANGER, N1, 30080, POLICY, "Service/shop/web-cluster");
    let relabel = |name: &str, node: &str, ip: &str, app: &str| {
        live.api.apply(yaml(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: web, image: nginx, ports: [{{name: http, containerPort: 8080}}]}}]\nstatus: {{phase: Running, podIP: {ip}}}\n"
        )));
    };
    // Out of the NetworkPolicy's selection, both backends admit everyone...
    relabel("web-1", "n1", "10.244.1.10", "web-canary");
    relabel("web-2", "n2", "10.244.2.10", "web-canary");
    live.expect(STRANGER, N1, 30080, ALLOW, "Service/shop/web-cluster");
    // ...and one relabelled back is enough to close the frontend again (admission is the
    // intersection over the backends under ETP Cluster).
    relabel("web-2", "n2", "10.244.2.10", "web");
    live.expect(STRANGER, N1, 30080, POLICY, "Service/shop/web-cluster");
    live.expect(PARTNER, N1, 30080, ALLOW, "Service/shop/web-cluster");
}

fn api_slice(node: &str) -> serde_json::Value {
    yaml(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: api-local-x7k2p, namespace: shop, labels: {{kubernetes.io/service-name: api-local}}}}\naddressType: IPv4\nports: [{{port: 9000, protocol: TCP}}]\nendpoints:\n  - {{addresses: [10.244.1.20], conditions: {{ready: true}}, nodeName: {node}, targetRef: {{kind: Pod, name: api-1, namespace: shop}}}}\n"
    ))
}

fn api_service(policy: &str) -> serde_json::Value {
    yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: api-local, namespace: shop}}\nspec:\n  type: NodePort\n  externalTrafficPolicy: {policy}\n  selector: {{app: api}}\n  ports: [{{port: 9000, targetPort: grpc, nodePort: 30090}}]\n"
    ))
}

#[test]
fn endpoints_moving_between_nodes_flip_no_local_endpoint() {
    let live = Live::start("move");
    live.expect(PARTNER, N1, 30090, ALLOW, "Service/shop/api-local");
    live.expect(PARTNER, N2, 30090, NO_LOCAL, "Service/shop/api-local");
    live.api.apply(api_slice("n2"));
    live.expect(PARTNER, N1, 30090, NO_LOCAL, "Service/shop/api-local");
    live.expect(PARTNER, N2, 30090, ALLOW, "Service/shop/api-local");
    live.api.apply(api_slice("n1"));
    live.expect(PARTNER, N1, 30090, ALLOW, "Service/shop/api-local");
    live.expect(PARTNER, N2, 30090, NO_LOCAL, "Service/shop/api-local");
}

#[test]
fn a_service_switches_between_cluster_and_local() {
    let live = Live::start("etp");
    live.expect(PARTNER, N2, 30090, NO_LOCAL, "Service/shop/api-local");
    live.api.apply(api_service("Cluster"));
    live.expect(PARTNER, N2, 30090, ALLOW, "Service/shop/api-local");
    live.expect(PARTNER, N1, 30090, ALLOW, "Service/shop/api-local");
    live.api.apply(api_service("Local"));
    live.expect(PARTNER, N2, 30090, NO_LOCAL, "Service/shop/api-local");
}

#[test]
fn losing_the_api_keeps_the_table_and_410_gone_relists() {
    let live = Live::start("outage");
    live.admit_stranger();
    let generation = live.generation();
    let lists = live.api.requests().lists.load(Relaxed);

    live.api.go_down();
    live.wait("the API to be seen unreachable", |l| {
        !l.source().status().api_reachable
    });
    let status = live.source().status();
    assert!(status.unreachable_since_unix.is_some() && status.last_error.is_some());
    // The last good table keeps deciding.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(live.generation(), generation);
    live.expect(STRANGER, N1, 30080, ALLOW, "GatewayPolicy/partner-b");

    // While the gateway is away the cluster moves on, and etcd compacts the history: the
    // watches cannot resume, so they must get 410 Gone and relist, and see the deletion.
    assert!(live
        .api
        .delete("portcullis.io/v1alpha1", "GatewayPolicy", "partner-b"));
    live.api.apply(api_slice("n2"));
    live.api.compact();
    live.api.come_back();

    live.wait("the API to be reachable again", |l| {
        l.source().status().api_reachable
    });
    live.expect(STRANGER, N1, 30080, POLICY, "Service/shop/web-cluster");
    live.expect(PARTNER, N2, 30090, ALLOW, "Service/shop/api-local");
    assert!(
        live.api.requests().gone.load(Relaxed) > 0,
        "no watch was told 410 Gone"
    );
    assert!(live.api.requests().lists.load(Relaxed) > lists, "no relist");
    let gp = live.kind("GatewayPolicy");
    assert!(gp.lists >= 2, "{gp:?}");
    // The watches asked for bookmarks: one arrives within a few of the server's 25 ms ticks.
    live.wait("a watch bookmark", |l| {
        l.api.requests().bookmarks.load(Relaxed) > 0
    });
}

#[test]
fn a_malformed_object_is_skipped_counted_and_reported() {
    let live = Live::start("malformed");
    let mut bad = gateway_policy("typo", "Deny", "198.51.100.0/24", 30080);
    bad["spec"]["ingress"][0]["destination"]["ports"] = json!(["eighty"]);
    live.api.apply(bad);
    // The valid object applies...
    live.admit_stranger();
    // ...the malformed one is skipped (its Deny is not in the table), counted and reported.
    live.expect(PARTNER, N1, 30080, ALLOW, "Service/shop/web-cluster");
    let status = live.source().status();
    let gp = live.kind("GatewayPolicy");
    assert_eq!((gp.objects, gp.invalid), (2, 1), "{gp:?}");
    assert_eq!(status.invalid_objects.len(), 1);
    assert!(
        status.invalid_objects[0]
            .starts_with("GatewayPolicy.portcullis.io typo: spec.ingress[0].destination.ports[0]"),
        "{status:#?}"
    );
    // Fixed, it applies.
    live.api
        .apply(gateway_policy("typo", "Deny", "198.51.100.0/24", 30080));
    live.expect(PARTNER, N1, 30080, POLICY, "GatewayPolicy/typo");
    assert!(live.source().status().invalid_objects.is_empty());

    // A malformed edit of a policy in force does not drop it: the previous version stays until
    // the edit is fixed (a typo must never open what a Deny closed).
    let mut broken = gateway_policy("typo", "Deny", "198.51.100.0/24", 30080);
    broken["spec"]["ingress"][0]["source"]["nets"] = json!(["198.51.100.0/33"]);
    live.api.apply(broken);
    live.wait("the edit to be reported", |l| {
        l.source().status().invalid_objects.len() == 1
    });
    let status = live.source().status();
    assert!(
        status.invalid_objects[0].ends_with("(the previous version stays in force)"),
        "{status:#?}"
    );
    std::thread::sleep(Duration::from_millis(100));
    live.expect(PARTNER, N1, 30080, POLICY, "GatewayPolicy/typo");
}

#[test]
fn calico_policies_appear_when_the_crd_is_installed() {
    let live = Live::start("calico");
    live.api
        .set_served("GlobalNetworkPolicy.crd.projectcalico.org", true);
    live.api.apply(yaml(
        "apiVersion: crd.projectcalico.org/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: block-partner}\nspec:\n  order: 10\n  preDNAT: true\n  applyOnForward: true\n  selector: role == 'edge'\n  ingress: [{action: Deny, protocol: TCP, source: {nets: [198.51.100.0/24]}}]\n",
    ));
    live.expect(PARTNER, N1, 30080, POLICY, "block-partner");
    assert_eq!(live.kind("GlobalNetworkPolicy").state, KindState::Synced);

    // Removing the CRD removes its policies, and the kind turns absent again.
    live.api
        .set_served("GlobalNetworkPolicy.crd.projectcalico.org", false);
    live.expect(PARTNER, N1, 30080, ALLOW, "Service/shop/web-cluster");
    live.wait("the kind to turn absent", |l| {
        l.kind("GlobalNetworkPolicy").state == KindState::Absent
    });
}

#[test]
fn calico_tiers_network_sets_host_endpoints_and_service_accounts_are_watched() {
    let live = Live::start("calico-kinds");
    for kind in [
        "GlobalNetworkPolicy",
        "Tier",
        "GlobalNetworkSet",
        "HostEndpoint",
    ] {
        live.api
            .set_served(&format!("{kind}.crd.projectcalico.org"), true);
    }
    live.api.apply(yaml(
        "apiVersion: crd.projectcalico.org/v1\nkind: Tier\nmetadata: {name: edge}\nspec: {order: 100}\n",
    ));
    live.api.apply(yaml(
        "apiVersion: crd.projectcalico.org/v1\nkind: HostEndpoint\nmetadata: {name: n1-eth0, labels: {hep: edge}}\nspec: {node: n1, interfaceName: eth0, expectedIPs: [10.0.0.11]}\n",
    ));
    live.api.apply(yaml(
        "apiVersion: crd.projectcalico.org/v1\nkind: GlobalNetworkSet\nmetadata: {name: partners, labels: {feed: partner}}\nspec: {nets: [198.51.100.0/24]}\n",
    ));
    live.api.apply(yaml(
        "apiVersion: crd.projectcalico.org/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: edge.block}\nspec:\n  tier: edge\n  preDNAT: true\n  applyOnForward: true\n  selector: hep == 'edge'\n  ingress: [{action: Deny, protocol: TCP, source: {selector: feed == 'partner'}}]\n",
    ));
    live.api.apply(yaml(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n",
    ));
    live.expect(PARTNER, N1, 30080, POLICY, "GlobalNetworkPolicy/edge.block");
    live.expect(PARTNER, N2, 30080, ALLOW, "Service/shop/web-cluster");
    for kind in ["Tier", "GlobalNetworkSet", "HostEndpoint", "ServiceAccount"] {
        assert_eq!(live.kind(kind).objects, 1, "{kind}: {:#?}", live.kind(kind));
    }
    // Deleting the network set empties the rule's source: the partner is admitted again.
    assert!(live
        .api
        .delete("crd.projectcalico.org/v1", "GlobalNetworkSet", "partners"));
    live.expect(PARTNER, N1, 30080, ALLOW, "Service/shop/web-cluster");
    assert!(live
        .api
        .delete("crd.projectcalico.org/v1", "HostEndpoint", "n1-eth0"));
    assert!(live.api.delete("crd.projectcalico.org/v1", "Tier", "edge"));
    assert!(live.api.delete("v1", "ServiceAccount", "shop/web"));
    live.wait("the deletions to be seen", |l| {
        ["Tier", "HostEndpoint", "ServiceAccount"]
            .iter()
            .all(|k| l.kind(k).objects == 0)
    });
}

#[test]
fn pod_status_churn_does_not_recompile() {
    let live = Live::start("churn");
    let generation = live.generation();
    for i in 0..20 {
        live.api.apply(yaml(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: web-1, namespace: shop, labels: {{app: web}}, annotations: {{heartbeat: '{i}'}}}}\nspec:\n  nodeName: n1\n  containers: [{{name: web, image: nginx, ports: [{{name: http, containerPort: 8080}}]}}]\nstatus: {{phase: Running, podIP: 10.244.1.10, podIPs: [{{ip: 10.244.1.10}}]}}\n"
        )));
    }
    live.wait("the events to arrive", |l| {
        l.source().status().ignored_events >= 20
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        live.generation(),
        generation,
        "nothing the compiler reads changed"
    );
}

#[test]
fn a_selector_nested_2600_deep_is_rejected_on_the_sources_own_thread() {
    // The report's case: a namespaced Calico policy whose selector nests ~2,600 parentheses used
    // to overflow the 2 MiB stack of the source's thread and abort the gateway, datapath included.
    let live = Live::start("deep");
    live.api
        .set_served("NetworkPolicy.crd.projectcalico.org", true);
    let selector = format!("{}app == 'web'{}", "(".repeat(2600), ")".repeat(2600));
    live.api.apply(json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deep", "namespace": "shop"},
        "spec": {"selector": selector, "ingress": [{"action": "Deny"}]}
    }));
    live.wait("the deep selector to be reported", |l| {
        l.source()
            .status()
            .invalid_objects
            .iter()
            .any(|e| e.contains("deep") && e.contains("nested deeper than 64"))
    });
    // The source lives on, and the rest applies.
    live.admit_stranger();
}

#[test]
fn an_object_over_the_compile_budget_is_left_out_and_reported() {
    let live = Live::start("budget");
    // 40 long IPv6 exceptions x 40 destinations: about 150,000 classifier atoms.
    let holes: Vec<String> = (0..40)
        .map(|i| format!("2001:db8:{:x}:{:x}::1/128", i * 7 + 1, i * 13 + 3))
        .collect();
    let dsts: Vec<String> = (0..40)
        .map(|i| format!("2001:db9:{:x}::1/128", i + 1))
        .collect();
    live.api.apply(json!({
        "apiVersion": "portcullis.io/v1alpha1", "kind": "GatewayPolicy",
        "metadata": {"name": "boom"},
        "spec": {"priority": 5, "ingress": [{"action": "Allow",
            "source": {"nets": ["2001:db8::/32"], "notNets": holes},
            "destination": {"nets": dsts}}]}
    }));
    live.admit_stranger();
    let status = live.reloader.lock().unwrap().status().clone();
    assert_eq!(status.rejected.len(), 1, "{status:#?}");
    assert!(
        status.rejected[0].starts_with("GatewayPolicy/boom (api:GatewayPolicy.portcullis.io/boom)"),
        "{status:#?}"
    );
    assert!(status.last_error.is_empty(), "{status:#?}");
}

#[test]
fn unreachable_since_is_set_once_per_outage_whatever_the_retries() {
    // Calico's and KubeVirt's kinds are not served (absent): their watchers retry too, and each
    // retry used to count as proof that the API was back.
    let live = Live::start("since");
    live.api.go_down();
    live.wait("the API to be seen unreachable", |l| {
        !l.source().status().api_reachable
    });
    let since = live.source().status().unreachable_since_unix;
    assert!(since.is_some());
    let started = Instant::now();
    let mut samples = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        let s = live.source().status();
        assert!(!s.api_reachable, "reachable during the outage: {s:#?}");
        assert_eq!(s.unreachable_since_unix, since, "{s:#?}");
        samples += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(samples > 100);
    live.api.come_back();
    live.wait("the API to be reachable again", |l| {
        let s = l.source().status();
        s.api_reachable && s.unreachable_since_unix.is_none()
    });
}

#[test]
fn a_403_at_api_start_is_warming_up_then_names_the_rbac_rule() {
    let mut live = Live::serve("forbid");
    // Longer than the test's 1.5 s grace: first "warming up", then the RBAC hint.
    live.api.forbid_for(Duration::from_millis(3500));
    live.watch();
    live.wait("a 403 reported as warming up", |l| {
        l.kind("Pod")
            .last_error
            .is_some_and(|e| e.contains("warming up"))
    });
    let s = live.source().status();
    assert!(s.api_reachable, "a 403 is an answer: {s:#?}");
    assert!(s.unreachable_since_unix.is_none(), "{s:#?}");
    assert!(!s.kinds.iter().any(|k| k
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("ClusterRole"))));
    live.wait("the 403 to outlast the grace", |l| {
        l.kind("Pod").last_error.is_some_and(|e| {
            e.contains("the ClusterRole needs get, list and watch on /api/v1/pods")
        })
    });
    // Warm: everything syncs.
    assert!(live.source().wait_synced(
        Some(Duration::from_secs(10)),
        Duration::from_secs(60),
        &|| false,
        &|_| {}
    ));
    assert!(live.kind("Pod").last_error.is_none());
}

/// The openAPIV3Schema of a generated CRD (`configs/deploy/<file>`).
fn crd_schema(file: &str) -> serde_json::Value {
    let g = control::crd::all()
        .into_iter()
        .find(|g| g.file == file)
        .unwrap();
    let crd: serde_json::Value = serde_norway::from_str(&g.yaml).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// `x-kubernetes-preserve-unknown-fields` taken out everywhere: a plain structural schema.
fn without_preserve(v: &mut serde_json::Value) {
    if let Some(m) = v.as_object_mut() {
        m.remove("x-kubernetes-preserve-unknown-fields");
        m.values_mut().for_each(without_preserve);
    } else if let Some(a) = v.as_array_mut() {
        a.iter_mut().for_each(without_preserve);
    }
}

#[test]
fn a_typo_never_widens_a_rule_through_a_pruning_api_server() {
    // The report's case: `sourc:` in an Allow rule, sent by a client that skips field
    // validation. A plain structural schema prunes it and the rule then matches every source.
    let live = Live::start("typo");
    let typo = json!({"apiVersion": "portcullis.io/v1alpha1", "kind": "GatewayPolicy",
        "metadata": {"name": "partner-typo"},
        "spec": {"priority": 100, "ingress": [{"action": "Allow", "protocol": "TCP",
                 "sourc": {"nets": ["198.51.100.0/24"]}, "destination": {"ports": [30080]}}]}});

    // With the generated CRD the API server stores the typo as written; the gateway refuses the
    // object by name and field, and nothing is admitted.
    live.api.set_schema(
        "GatewayPolicy.portcullis.io",
        Some(crd_schema("00-crd-gatewaypolicy.yaml")),
    );
    live.api.apply(typo.clone());
    live.wait("the typo to be reported", |l| {
        l.source()
            .status()
            .invalid_objects
            .iter()
            .any(|e| e.contains("partner-typo") && e.contains("sourc"))
    });
    std::thread::sleep(Duration::from_millis(100));
    live.expect(STRANGER, N1, 30080, POLICY, "Service/shop/web-cluster");
    live.expect(PARTNER, N1, 30080, ALLOW, "Service/shop/web-cluster");

    // Why it must be so: the same object through a schema without the preserve markers loses the
    // typo, and the rule opens the port to everyone.
    let mut plain = crd_schema("00-crd-gatewaypolicy.yaml");
    without_preserve(&mut plain);
    live.api
        .set_schema("GatewayPolicy.portcullis.io", Some(plain));
    live.api.apply(typo);
    live.expect(STRANGER, N1, 30080, ALLOW, "GatewayPolicy/partner-typo");
}

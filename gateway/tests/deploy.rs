//! The deploy manifests in `configs/deploy/` parse, fit together (names, ServiceAccount,
//! ConfigMaps), grant only read verbs on exactly the kinds the policy engine reads, and ship a
//! gateway config and policies that load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use control::source::kubernetes::KINDS;
use gateway::config::Config;
use policy::object::add_object;
use policy::snapshot::Snapshot;
use serde_json::Value;

fn documents() -> Vec<(PathBuf, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/deploy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            out.push((f.clone(), v));
        }
    }
    out
}

#[test]
fn deploy_manifests_fit_together() {
    let docs = documents();
    let by_kind = |k: &str| {
        docs.iter()
            .filter(|(_, v)| v["kind"] == k)
            .map(|(_, v)| v)
            .collect::<Vec<_>>()
    };
    for (f, v) in &docs {
        let kind = v["kind"].as_str().unwrap_or_default();
        assert!(
            [
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "ConfigMap",
                "DaemonSet",
                "CustomResourceDefinition"
            ]
            .contains(&kind),
            "{}: unexpected kind {kind}",
            f.display()
        );
        assert!(
            v["metadata"]["name"].is_string(),
            "{}: a {kind} needs a name",
            f.display()
        );
    }

    // RBAC: read-only, and every kind the engine reads is covered.
    let role = by_kind("ClusterRole")[0];
    let mut granted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for rule in role["rules"].as_array().unwrap() {
        let verbs: Vec<&str> = rule["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        assert!(
            verbs.iter().all(|v| ["get", "list", "watch"].contains(v)),
            "only read verbs: {verbs:?}"
        );
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                granted
                    .entry(g.as_str().unwrap().to_string())
                    .or_default()
                    .push(r.as_str().unwrap().to_string());
            }
        }
    }
    // Exactly what the Kubernetes source watches (crd.projectcalico.org is Calico's storage
    // API; projectcalico.org is its aggregated API, granted for clusters that read through it).
    for k in KINDS {
        assert!(
            granted
                .get(k.group)
                .is_some_and(|r| r.iter().any(|x| x == k.plural)),
            "RBAC lacks {}/{}",
            k.group,
            k.plural
        );
    }
    for (group, resources) in &granted {
        for r in resources {
            assert!(
                KINDS
                    .iter()
                    .any(|k| k.plural == r && (k.group == group || group == "projectcalico.org")),
                "RBAC grants {group}/{r}, which nothing watches"
            );
        }
    }
    // Our CRDs are in the manifests, with the names the source watches.
    for k in KINDS.iter().filter(|k| k.group == "portcullis.io") {
        let crd = by_kind("CustomResourceDefinition")
            .into_iter()
            .find(|c| c["spec"]["names"]["kind"] == k.kind)
            .unwrap_or_else(|| panic!("no CRD for {}", k.kind));
        assert_eq!(crd["spec"]["group"], k.group);
        assert_eq!(crd["spec"]["names"]["plural"], k.plural);
        assert_eq!(crd["metadata"]["name"], format!("{}.{}", k.plural, k.group));
        assert!(crd["spec"]["versions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == k.version && v["served"] == true));
    }
    let sa = by_kind("ServiceAccount")[0];
    let binding = by_kind("ClusterRoleBinding")[0];
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["namespace"],
        sa["metadata"]["namespace"]
    );

    // The DaemonSet uses that account, host networking, bpffs, and ConfigMaps that exist.
    let ds = by_kind("DaemonSet")[0];
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(pod["hostNetwork"], true);
    assert!(pod["nodeSelector"].is_object());
    let caps: Vec<&str> = pod["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for c in ["NET_ADMIN", "NET_RAW", "BPF", "IPC_LOCK"] {
        assert!(caps.contains(&c), "capability {c} missing: {caps:?}");
    }
    assert_eq!(pod["containers"][0]["securityContext"]["privileged"], false);
    let maps: Vec<&Value> = by_kind("ConfigMap");
    for vol in pod["volumes"].as_array().unwrap() {
        if let Some(name) = vol["configMap"]["name"].as_str() {
            assert!(
                maps.iter().any(|m| m["metadata"]["name"] == name),
                "volume references missing ConfigMap {name}"
            );
        }
    }
    assert!(pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["hostPath"]["path"] == "/sys/fs/bpf"));

    // The shipped config and policies load.
    let cfg_map = maps
        .iter()
        .find(|m| m["metadata"]["name"] == "portcullis-config")
        .unwrap();
    let cfg = Config::parse(
        cfg_map["data"]["gateway.yaml"].as_str().unwrap(),
        Path::new("/etc/portcullis/gateway.yaml"),
    )
    .unwrap();
    assert_eq!(cfg.policy_dir, Path::new("/etc/portcullis/policies"));
    let api = cfg
        .kubernetes_api
        .as_ref()
        .expect("the DaemonSet watches the API");
    assert!(api.kubeconfig.is_none(), "in-cluster service account");

    // Readiness follows /healthz (synced, API reachable); liveness only asks that the process
    // answers, so losing the API never restarts a gateway that still forwards.
    let c = &pod["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "metrics");
    // Metrics are scraped on the node address, read-only; the admin API is a root-only socket
    // in a volume of its own, which the liveness probe and `kubectl exec` use.
    let listen = cfg.metrics.listen.expect("metrics.listen");
    assert_eq!(listen.port(), 9477);
    assert!(listen.ip().is_unspecified(), "{listen}");
    assert!(c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "metrics" && p["containerPort"] == 9477));
    let sock = cfg.admin.socket.as_ref().expect("admin.socket");
    assert_eq!(cfg.admin.mode, 0o600);
    assert!(cfg.admin.listen.is_none(), "no admin API over TCP");
    assert!(c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| Path::new(m["mountPath"].as_str().unwrap()) == sock.parent().unwrap()));
    let live: Vec<&str> = c["livenessProbe"]["exec"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        live.contains(&"stats") && live.contains(&sock.to_str().unwrap()),
        "{live:?}"
    );
    assert!(
        c["livenessProbe"]["httpGet"].is_null()
            || c["livenessProbe"]["httpGet"]["path"] != "/healthz"
    );
    let policies = maps
        .iter()
        .find(|m| m["metadata"]["name"] == "portcullis-policies")
        .unwrap();
    let mut snap = Snapshot::default();
    for (name, text) in policies["data"].as_object().unwrap() {
        let v: serde_norway::Value = serde_norway::from_str(text.as_str().unwrap()).unwrap();
        add_object(v, name, &mut snap).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let compiled = policy::compile::compile(&snap, &cfg.context).unwrap();
    assert!(compiled.rules.len() > 2);
}

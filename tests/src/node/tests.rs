//! Unit tests of the config the harness writes: it must parse as TOML and use
//! only keys that the shipped `cluster-config/single.toml` uses, so the
//! harness stays in step with the real config format.

use std::collections::BTreeSet;

use super::*;

fn keys(value: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let toml::Value::Table(t) = value {
        for (k, v) in t {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_table() {
                keys(v, &path, out);
            } else {
                out.insert(path);
            }
        }
    }
}

#[test]
fn written_config_parses_with_the_chosen_values() {
    let cfg = NodeConfig {
        outbound_queue: 64,
        sync: "full".to_string(),
        ..NodeConfig::default()
    };
    let addr: SocketAddr = "127.0.0.1:4567".parse().expect("addr");
    let text = cfg.to_toml(addr, Path::new("/tmp/some dir/data"));
    let v: toml::Value = toml::from_str(&text).expect("valid TOML");
    assert_eq!(v["node"]["listen"].as_str(), Some("127.0.0.1:4567"));
    assert_eq!(v["node"]["data_dir"].as_str(), Some("/tmp/some dir/data"));
    assert_eq!(v["storage"]["sync"].as_str(), Some("full"));
    assert_eq!(v["limits"]["outbound_queue"].as_integer(), Some(64));
    assert_eq!(
        v["auth"]["jwt_secret"].as_str(),
        Some(cfg.jwt_secret.as_str())
    );
}

#[test]
fn written_config_uses_only_keys_of_the_shipped_config() {
    let shipped_path = workspace_root().join("cluster-config").join("single.toml");
    let shipped = std::fs::read_to_string(&shipped_path).expect("read single.toml");
    let shipped: toml::Value = toml::from_str(&shipped).expect("single.toml parses");
    let ours: toml::Value = toml::from_str(
        &NodeConfig::default().to_toml("127.0.0.1:1".parse().expect("addr"), Path::new("/x")),
    )
    .expect("ours parses");
    let (mut want, mut got) = (BTreeSet::new(), BTreeSet::new());
    keys(&shipped, "", &mut want);
    keys(&ours, "", &mut got);
    let unknown: Vec<_> = got.difference(&want).collect();
    assert!(
        unknown.is_empty(),
        "harness writes keys single.toml lacks: {unknown:?}"
    );
    let missing: Vec<_> = want.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "harness omits keys of single.toml: {missing:?}"
    );
}

#[test]
fn free_addr_is_loopback() {
    let a = free_addr().expect("free port");
    assert!(a.ip().is_loopback());
    assert_ne!(a.port(), 0);
}

#[test]
fn cluster_config_uses_only_keys_of_the_shipped_cluster_configs() {
    let mut want = BTreeSet::new();
    for f in ["single.toml", "local-3node/node1.toml"] {
        let path = workspace_root().join("cluster-config").join(f);
        let text = std::fs::read_to_string(&path).expect("read shipped config");
        keys(&toml::from_str(&text).expect("parses"), "", &mut want);
    }
    // The one optional key the shipped configs leave at its default.
    want.insert("cluster.reconnect_interval_ms".to_string());
    let cfg = NodeConfig {
        storage_path: Some(PathBuf::from("/tmp/shared dir/chat.db")),
        cluster: Some(ClusterConfig {
            listen: "127.0.0.1:9101".parse().expect("addr"),
            cookie: "a-cookie-of-16-bytes".to_string(),
            seeds: vec!["127.0.0.1:9102".parse().expect("addr")],
            ping_interval_ms: 250,
            failure_timeout_ms: 1500,
            reconnect_interval_ms: Some(500),
        }),
        ..NodeConfig::default()
    };
    let v: toml::Value =
        toml::from_str(&cfg.to_toml("127.0.0.1:1".parse().expect("addr"), Path::new("/x")))
            .expect("ours parses");
    assert_eq!(
        v["storage"]["path"].as_str(),
        Some("/tmp/shared dir/chat.db")
    );
    assert_eq!(v["cluster"]["listen"].as_str(), Some("127.0.0.1:9101"));
    assert_eq!(
        v["cluster"]["seeds"].as_array().map(Vec::len),
        Some(1),
        "seeds: {:?}",
        v["cluster"]["seeds"]
    );
    assert_eq!(v["cluster"]["failure_timeout_ms"].as_integer(), Some(1500));
    let mut got = BTreeSet::new();
    keys(&v, "", &mut got);
    let unknown: Vec<_> = got.difference(&want).collect();
    assert!(
        unknown.is_empty(),
        "harness writes keys no shipped config has: {unknown:?}"
    );
}

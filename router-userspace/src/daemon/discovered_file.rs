//! The backend lists Kubernetes discovery last applied, kept beside the
//! control socket like the overrides. A restarted daemon that adopts its
//! pinned datapath serves each discovered service on its saved list until
//! the service's watcher has listed afresh, so a restart (or an API server
//! that is down meanwhile) drops no backend the datapath was serving, and
//! overrides of discovered backends are restored with them. A daemon that
//! loads a new datapath starts from no backends and the first list.

use std::{collections::BTreeMap, net::SocketAddrV4, path::Path, path::PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::config::{BackendConfig, Config, KubernetesDiscovery};
use crate::state_file;

/// One discovered service's list, and which Kubernetes Service it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedList {
    pub namespace: String,
    pub service: String,
    pub backends: Vec<SavedBackend>,
}

/// What discovery learns of a backend; the rest comes from the service's
/// `discovery.kubernetes` settings (see `KubernetesDiscovery::backend`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedBackend {
    pub name: String,
    pub address: SocketAddrV4,
    pub drain: bool,
}

/// Service name → its saved list.
pub type SavedLists = BTreeMap<String, SavedList>;

/// `<control socket's directory>/<socket name>.discovered.json`.
pub fn path_for(control_socket: &Path) -> PathBuf {
    state_file::beside(control_socket, "discovered.json")
}

/// The saved lists, or none when no file exists. A corrupt file, or one
/// this daemon cannot trust, is an error: whoever could write it could
/// send traffic anywhere.
pub fn load(path: &Path) -> Result<SavedLists> {
    state_file::load_json(path, "saved discovered backends")
}

/// Writes atomically, mode 0600, never through a link.
pub fn save(path: &Path, lists: &SavedLists) -> Result<()> {
    state_file::save_json(path, lists, "discovered backends")
}

/// The lists of `applied` (service → backends) for the discovered
/// services of `cfg`.
pub fn lists_of(cfg: &Config, applied: &BTreeMap<String, Vec<BackendConfig>>) -> SavedLists {
    cfg.services
        .iter()
        .filter_map(|s| {
            let d = s.discovery.as_ref()?;
            let backends = applied.get(&s.name)?;
            Some((
                s.name.clone(),
                SavedList {
                    namespace: d.namespace.clone(),
                    service: d.service.clone(),
                    // Discovery lists IPv4 endpoints only (see `slices`).
                    backends: backends
                        .iter()
                        .filter_map(|b| match b.address {
                            std::net::SocketAddr::V4(address) => Some(SavedBackend {
                                name: b.name.clone(),
                                address,
                                drain: b.drain,
                            }),
                            std::net::SocketAddr::V6(_) => None,
                        })
                        .collect(),
                },
            ))
        })
        .collect()
}

/// Gives each discovered service of `cfg` its saved list, where one was
/// saved from the same Kubernetes Service; returns the services seeded. A
/// list the config has no room for now is left out, with a warning.
pub fn seed(cfg: Config, saved: &SavedLists) -> (Config, Vec<String>) {
    let mut cfg = cfg;
    let mut seeded = Vec::new();
    for i in 0..cfg.services.len() {
        let svc = &cfg.services[i];
        let Some(d) = svc.discovery.as_ref() else {
            continue;
        };
        let Some(list) = saved.get(&svc.name).filter(|l| same_source(l, d)) else {
            continue;
        };
        let name = svc.name.clone();
        let backends = list
            .backends
            .iter()
            .map(|b| d.backend(b.name.clone(), b.address, b.drain))
            .collect();
        match cfg.with_backends(i, backends) {
            Ok(c) => {
                cfg = c;
                seeded.push(name);
            }
            Err(e) => tracing::warn!(
                service = name,
                "saved discovered backends not used: {e}; the service waits for its first list"
            ),
        }
    }
    (cfg, seeded)
}

fn same_source(l: &SavedList, d: &KubernetesDiscovery) -> bool {
    l.namespace == d.namespace && l.service == d.service
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[daemon]
interface = "eth0"

[[service]]
name = "llama"
vip = "198.18.100.1:8000"
snat = "198.18.0.1"
discovery = { kubernetes = { namespace = "inference", service = "llama" } }

[[service]]
name = "other"
vip = "198.18.100.2:8000"
snat = "198.18.0.1"
discovery = { kubernetes = { namespace = "inference", service = "other", capacity = 2.0 } }
"#;

    fn saved(service: &str, n: u8) -> SavedList {
        SavedList {
            namespace: "inference".into(),
            service: service.into(),
            backends: (0..n)
                .map(|i| SavedBackend {
                    name: format!("pod-{i}"),
                    address: SocketAddrV4::new([198, 18, 0, 11 + i].into(), 8000),
                    drain: i == 1,
                })
                .collect(),
        }
    }

    #[test]
    fn lists_seed_their_own_services_with_the_services_settings_and_round_trip() {
        let cfg = Config::parse(CONFIG, "t.toml").unwrap();
        let lists = SavedLists::from([
            ("llama".to_string(), saved("llama", 2)),
            // Saved from another Kubernetes Service: not this one's any more.
            ("other".to_string(), saved("renamed", 1)),
            ("gone".to_string(), saved("gone", 1)),
        ]);
        let (cfg, seeded) = seed(cfg, &lists);
        assert_eq!(seeded, ["llama"]);
        let llama = &cfg.services[0].backends;
        assert_eq!(llama.len(), 2);
        assert_eq!(
            (llama[1].name.as_str(), llama[1].drain, llama[1].capacity),
            ("pod-1", true, 1.0)
        );
        assert!(cfg.services[1].backends.is_empty());

        let applied = BTreeMap::from([("llama".to_string(), llama.clone())]);
        let again = lists_of(&cfg, &applied);
        assert_eq!(
            again,
            SavedLists::from([("llama".to_string(), saved("llama", 2))])
        );

        let dir = std::env::temp_dir().join(format!("router-discovered-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = path_for(&dir.join("router.sock"));
        assert!(load(&path).unwrap().is_empty(), "no file: nothing saved");
        save(&path, &again).unwrap();
        assert_eq!(load(&path).unwrap(), again);
        std::fs::write(&path, b"{ not json").unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(err.contains("corrupt"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! `[[service]]` and their backends: addresses, SNAT, selection,
//! fallbacks, and the table size they need.
use super::{
    super::{
        locate::{KeyPath, Locator},
        raw::*,
    },
    pools::{validate_pools, validate_segments},
    *,
};
use router_common::pools::MAX_SEGMENTS;

pub(in crate::config) fn validate_services(
    loc: &Locator<'_>,
    raw: Vec<RawService>,
    policy: &PolicyConfig,
) -> Result<Vec<ServiceConfig>, ConfigError> {
    let base = KeyPath::default().key("service");
    if raw.len() > MAX_SERVICES as usize {
        return Err(loc.err(
            &base.index(MAX_SERVICES as usize),
            format!("at most {MAX_SERVICES} services are supported"),
        ));
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut vips: HashMap<(SocketAddr, Protocol), usize> = HashMap::new();
    let mut total_backends = 0usize;
    let mut table_slots = 0usize;
    let mut total_segments = 0usize;
    let mut services = Vec::with_capacity(raw.len());

    for (s, svc) in raw.into_iter().enumerate() {
        let sp = base.index(s);

        if svc.name.is_empty() {
            return Err(loc.err(&sp.key("name"), "service name must not be empty"));
        }
        if let Some(&first) = names.get(&svc.name) {
            return Err(loc.err(
                &sp.key("name"),
                format!(
                    "duplicate service name {:?} (first used at line {})",
                    svc.name,
                    loc.line(&base.index(first).key("name"))
                ),
            ));
        }
        names.insert(svc.name.clone(), s);

        let vip = parse_socket_addr(&svc.vip).map_err(|m| loc.err(&sp.key("vip"), m))?;
        if let Some(&first) = vips.get(&(vip, svc.protocol)) {
            return Err(loc.err(
                &sp.key("vip"),
                format!(
                    "{vip}/{} is already used by service {:?}",
                    svc.protocol,
                    services_name(&services, first)
                ),
            ));
        }
        vips.insert((vip, svc.protocol), s);

        let forwarding = validate_forwarding(loc, &sp, &svc)?;
        if vip.is_ipv6() {
            check_ipv6_service(loc, &sp, &svc)?;
        }
        let snat_key = sp.key("snat");
        let snat_items = svc.snat.as_ref().map_or(&[][..], |l| l.items.as_slice());
        if forwarding.is_dsr() {
            if !snat_items.is_empty() {
                return Err(loc.err(
                    &snat_key,
                    "a DSR service's backends answer clients from the VIP themselves; leave snat out",
                ));
            }
        } else if snat_items.is_empty() || snat_items.len() > MAX_SNAT_ADDRS {
            return Err(loc.err(
                &snat_key,
                format!(
                    "needs 1 to {MAX_SNAT_ADDRS} addresses, got {}",
                    snat_items.len()
                ),
            ));
        }
        let mut snat = Vec::with_capacity(snat_items.len());
        if let Some(list) = &svc.snat {
            for (j, a) in list.items.iter().enumerate() {
                let key = list.item_path(&snat_key, j);
                let addr = parse_snat_addr(a, vip.is_ipv6()).map_err(|m| loc.err(&key, m))?;
                // `router` SNATs an IPv4 flow to an IPv4 address and
                // `router_nat6` an IPv6 one to an IPv6 address: a
                // translation never changes the family.
                if addr.is_ipv6() != vip.is_ipv6() {
                    return Err(loc.err(
                        &key,
                        format!(
                            "{addr} is {} but the service's VIP is {}; a service's SNAT \
                             addresses are of its VIP's family",
                            family(addr.is_ipv6()),
                            family(vip.is_ipv6())
                        ),
                    ));
                }
                if snat.contains(&addr) {
                    return Err(loc.err(&key, format!("SNAT address {addr} is listed twice")));
                }
                snat.push(addr);
            }
        }

        let bp = sp.key("backend");
        let discovery = svc
            .discovery
            .map(|d| validate_discovery(loc, &sp.key("discovery"), d, policy))
            .transpose()?;
        if discovery.is_some() {
            if !svc.backend.is_empty() {
                return Err(loc.err(
                    &sp.key("discovery"),
                    "a discovered service takes its backends from Kubernetes; remove its \
                     [[service.backend]] tables",
                ));
            }
            // Pools name backends, which a discovered service does not know
            // until it runs.
            if !svc.pool.is_empty() {
                return Err(loc.err(
                    &sp.key("pool"),
                    "a discovered service cannot have pools: its backends are not known in advance",
                ));
            }
        } else if svc.backend.is_empty() {
            return Err(loc.err(
                &bp,
                format!("service {:?} needs at least one backend", svc.name),
            ));
        }
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(svc.backend.len());
        for (b, be) in svc.backend.into_iter().enumerate() {
            let p = bp.index(b);
            total_backends += 1;
            if total_backends > MAX_BACKENDS as usize {
                return Err(loc.err(
                    &p,
                    format!("at most {MAX_BACKENDS} backends are supported across all services"),
                ));
            }
            if be.name.is_empty() {
                return Err(loc.err(&p.key("name"), "backend name must not be empty"));
            }
            if let Some(first) = backends.iter().position(|x| x.name == be.name) {
                return Err(loc.err(
                    &p.key("name"),
                    format!(
                        "duplicate backend name {:?} in service {:?} (first used at line {})",
                        be.name,
                        svc.name,
                        loc.line(&bp.index(first).key("name"))
                    ),
                ));
            }
            let address =
                parse_socket_addr(&be.address).map_err(|m| loc.err(&p.key("address"), m))?;
            if address.is_ipv6() != vip.is_ipv6() {
                return Err(loc.err(
                    &p.key("address"),
                    format!(
                        "{address} is {} but the service's VIP is {}; a service's VIP and \
                         backends are one family",
                        family(address.is_ipv6()),
                        family(vip.is_ipv6())
                    ),
                ));
            }
            // Maglev seeds each backend's permutation with its address, so
            // two backends on one address would compete for the same slots.
            if let Some(other) = backends.iter().find(|x| x.address == address) {
                return Err(loc.err(
                    &p.key("address"),
                    format!(
                        "{address} is already backend {:?} of this service",
                        other.name
                    ),
                ));
            }
            let capacity = match be.capacity {
                None => 1.0,
                Some(_) if be.weight.is_some() => {
                    return Err(loc.err(
                        &p.key("capacity"),
                        "give `weight` (a pinned weight) or `capacity` (policy-driven), not both",
                    ));
                }
                Some(c) if c.is_finite() && c > 0.0 => c,
                Some(c) => {
                    return Err(loc.err(
                        &p.key("capacity"),
                        format!("{c} must be a finite number above 0"),
                    ));
                }
            };
            let cost_per_hour = match be.cost_per_hour {
                Some(c) if !(c.is_finite() && c >= 0.0) => {
                    return Err(loc.err(
                        &p.key("cost_per_hour"),
                        format!("{c} must be a finite number >= 0"),
                    ));
                }
                c => c,
            };
            let telemetry = be
                .telemetry
                .map(|t| validate_telemetry(loc, &p.key("telemetry"), t))
                .transpose()?;
            let health = be
                .health
                .map(|h| validate_health(loc, &p.key("health"), h))
                .transpose()?;
            let weight = match (be.weight, &telemetry) {
                (Some(w), _) => Some(w),
                // Static: today's default, scaled by capacity.
                (None, None) => Some(policy.full(capacity)),
                (None, Some(_)) => None,
            };
            if be.max_in_flight == Some(0) {
                return Err(loc.err(
                    &p.key("max_in_flight"),
                    "0 would leave the backend no room ever; leave it out for no limit",
                ));
            }
            backends.push(BackendConfig {
                name: be.name,
                address,
                weight,
                capacity,
                telemetry,
                health,
                cost_per_hour,
                drain: be.drain.unwrap_or(false),
                max_in_flight: be.max_in_flight,
            });
        }

        // Telemetry-driven services place by load: their weights are
        // capacities, and counting in-flight work at the moment of each
        // pick is what keeps bursts off one replica between polls. Static
        // services keep consistent hashing, which needs no shared state.
        // A DSR service never sees its backends' answers, so nothing counts
        // what is in flight: it places by Maglev, which is also what lets
        // another LB node place a moved flow alike.
        if forwarding.is_dsr() && svc.selection == Some(Selection::LeastLoaded) {
            return Err(loc.err(
                &sp.key("selection"),
                "least_loaded counts requests in flight from the backends' answers, which a DSR \
                 service never sees; use maglev (the default for DSR)",
            ));
        }
        let selection = svc.selection.unwrap_or_else(|| {
            let telemetry = backends.iter().any(|b| b.telemetry.is_some())
                || discovery.as_ref().is_some_and(|d| d.telemetry.is_some());
            // An IPv6 service places by Maglev whatever its backends
            // report: `router_nat6` counts nothing in flight.
            if !forwarding.is_dsr() && !vip.is_ipv6() && telemetry {
                Selection::LeastLoaded
            } else {
                Selection::Maglev
            }
        });
        let pools = validate_pools(loc, &sp, svc.pool, &backends)?;
        let segments = validate_segments(loc, &sp, svc.segment, &pools)?;
        if !pools.is_empty() && svc.fallback.is_some() {
            return Err(loc.err(
                &sp.key("fallback"),
                "a service with pools spills through a pool's `fallback`, not a fallback service",
            ));
        }
        // A pool's table takes a service's slot in the datapath.
        table_slots += 1 + pools.len();
        if table_slots > MAX_SERVICES as usize {
            return Err(loc.err(
                &sp.key("pool"),
                format!("services and their pools need {table_slots} tables; at most {MAX_SERVICES} are supported"),
            ));
        }
        total_segments += segments.len();
        if total_segments > MAX_SEGMENTS as usize {
            return Err(loc.err(
                &sp.key("segment"),
                format!("at most {MAX_SEGMENTS} segments are supported across all services"),
            ));
        }
        services.push(ServiceConfig {
            name: svc.name,
            vip,
            protocol: svc.protocol,
            snat,
            backends,
            fallback: svc.fallback,
            selection,
            pools,
            segments,
            forwarding,
            discovery,
        });
    }
    for (i, svc) in services.iter().enumerate() {
        let Some(fb) = &svc.fallback else { continue };
        let key = base.index(i).key("fallback");
        let Some(target) = services.iter().find(|s| &s.name == fb) else {
            return Err(loc.err(&key, format!("no service named {fb:?}")));
        };
        if target.name == svc.name {
            return Err(loc.err(&key, "a service cannot be its own fallback"));
        }
        if !target.pools.is_empty() {
            return Err(loc.err(
                &key,
                format!("{fb:?} has pools; a fallback service lends all its backends, so it cannot have any"),
            ));
        }
        if target.vip.is_ipv6() != svc.vip.is_ipv6() {
            return Err(loc.err(
                &key,
                format!(
                    "{fb:?} listens on {}, this service on {}; a fallback lends its backends, \
                     which must be of this service's address family",
                    target.vip, svc.vip
                ),
            ));
        }
        if target.protocol != svc.protocol {
            return Err(loc.err(
                &key,
                format!(
                    "{fb:?} is {}, this service is {}",
                    target.protocol, svc.protocol
                ),
            ));
        }
        if target.backends.len() + svc.backends.len() > MAX_BACKENDS as usize {
            return Err(loc.err(
                &key,
                "with its fallback the service exceeds the backend limit",
            ));
        }
    }
    Ok(services)
}

fn family(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

pub(in crate::config) fn services_name(services: &[ServiceConfig], i: usize) -> &str {
    services.get(i).map_or("", |s| s.name.as_str())
}

pub(in crate::config) fn check_table_size(
    loc: &Locator<'_>,
    daemon: &DaemonConfig,
    services: &[ServiceConfig],
) -> Result<(), ConfigError> {
    let largest = services
        .iter()
        .max_by_key(|s| s.backends.len())
        .map(|s| (s.name.as_str(), s.backends.len()));
    crate::maglev::check_table_size(daemon.table_size, largest)
        .map_err(|e| loc.err(&KeyPath::default().key("daemon").key("table_size"), e))
}

/// What an IPv6 VIP's service may be: `router_v6` (DSR) and
/// `router_nat6` (NAT) place every flow from the service's own Maglev
/// table (no pools or segments, and no count of flows in flight to place
/// by load), and discovery lists IPv4 endpoints only.
fn check_ipv6_service(
    loc: &Locator<'_>,
    sp: &KeyPath,
    svc: &RawService,
) -> Result<(), ConfigError> {
    if svc.selection == Some(Selection::LeastLoaded) {
        return Err(loc.err(
            &sp.key("selection"),
            "placement by load (least_loaded) is IPv4 only; an IPv6 service places by Maglev \
             (selection = \"maglev\", the default)",
        ));
    }
    if !svc.pool.is_empty() {
        return Err(loc.err(
            &sp.key("pool"),
            "an IPv6 service places every flow from its own table; pools are IPv4 only",
        ));
    }
    if !svc.segment.is_empty() {
        return Err(loc.err(
            &sp.key("segment"),
            "an IPv6 service places every flow from its own table; segments are IPv4 only",
        ));
    }
    if svc.discovery.is_some() {
        return Err(loc.err(
            &sp.key("discovery"),
            "discovery lists IPv4 endpoints only; write an IPv6 service's backends in the file",
        ));
    }
    Ok(())
}

/// `forwarding`, `encap` and `gue_port` of service `sp`.
fn validate_forwarding(
    loc: &Locator<'_>,
    sp: &KeyPath,
    svc: &RawService,
) -> Result<Forwarding, ConfigError> {
    match (svc.forwarding, svc.encap) {
        (RawForwarding::Nat, None) => {}
        (RawForwarding::Nat, Some(_)) => {
            return Err(loc.err(
                &sp.key("encap"),
                "encap applies to forwarding = \"dsr\"; a NAT service sends packets as they are",
            ));
        }
        (RawForwarding::Dsr, None) => {
            return Err(loc.err(
                &sp.key("forwarding"),
                "forwarding = \"dsr\" needs encap = \"ipip\" or \"gue\": how packets reach the backends",
            ));
        }
        (RawForwarding::Dsr, Some(_)) => {}
    }
    match (svc.encap, svc.gue_port) {
        (Some(Encap::Ipip), None) => Ok(Forwarding::Ipip),
        (Some(Encap::Gue), None) => Ok(Forwarding::Gue {
            port: router_common::dsr::DEFAULT_GUE_PORT,
        }),
        (Some(Encap::Gue), Some(0)) => Err(loc.err(&sp.key("gue_port"), "must be 1 to 65535")),
        (Some(Encap::Gue), Some(port)) => Ok(Forwarding::Gue { port }),
        (_, Some(_)) => Err(loc.err(&sp.key("gue_port"), "gue_port applies to encap = \"gue\"")),
        (None, None) => Ok(Forwarding::Nat),
    }
}

/// `discovery` of service `dp`'s parent: names as Kubernetes allows them,
/// a port name or number, and the discovered backends' capacity. Whether
/// credentials exist is the daemon's check (`discovery::check_credentials`):
/// it depends on the host, not on the text.
fn validate_discovery(
    loc: &Locator<'_>,
    dp: &KeyPath,
    raw: RawDiscovery,
    policy: &PolicyConfig,
) -> Result<KubernetesDiscovery, ConfigError> {
    let Some(k) = raw.kubernetes else {
        return Err(loc.err(
            dp,
            "needs kubernetes = { namespace = \"...\", service = \"...\" }",
        ));
    };
    let kp = dp.key("kubernetes");
    for (key, value) in [("namespace", &k.namespace), ("service", &k.service)] {
        if !is_dns_label(value) {
            return Err(loc.err(
                &kp.key(key),
                format!(
                    "{value:?} is not a Kubernetes name (1 to 63 lowercase letters, digits and \
                     '-', starting and ending with a letter or digit)"
                ),
            ));
        }
    }
    let port = match k.port {
        None => None,
        Some(RawPort::Number(n)) => match u16::try_from(n) {
            Ok(p) if p > 0 => Some(EndpointPort::Number(p)),
            _ => return Err(loc.err(&kp.key("port"), format!("{n} is not a port (1 to 65535)"))),
        },
        Some(RawPort::Name(n)) if n.is_empty() => {
            return Err(loc.err(
                &kp.key("port"),
                "an empty port name; leave port out for the slice's only port",
            ));
        }
        Some(RawPort::Name(n)) => Some(EndpointPort::Name(n)),
    };
    if k.kubeconfig
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        return Err(loc.err(
            &kp.key("kubeconfig"),
            "an empty path; leave kubeconfig out for $KUBECONFIG, ~/.kube/config or the pod's \
             service account",
        ));
    }
    let capacity = match k.capacity {
        None => 1.0,
        Some(c) if c.is_finite() && c > 0.0 => c,
        Some(c) => {
            return Err(loc.err(
                &kp.key("capacity"),
                format!("{c} must be a finite number above 0"),
            ));
        }
    };
    let telemetry = k
        .telemetry
        .map(|t| validate_discovered_telemetry(loc, &kp.key("telemetry"), t))
        .transpose()?;
    Ok(KubernetesDiscovery {
        namespace: k.namespace,
        service: k.service,
        port,
        kubeconfig: k.kubeconfig,
        capacity,
        weight: telemetry.is_none().then(|| policy.full(capacity)),
        telemetry,
    })
}

/// An RFC 1123 label, what namespaces and Services are named by.
fn is_dns_label(s: &str) -> bool {
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|&c| alnum(c) || c == b'-')
        && b.first().copied().is_some_and(alnum)
        && b.last().copied().is_some_and(alnum)
}

/// A discovered service's telemetry: a remote source (the pods are not on
/// this host) whose URL names each pod by `{ip}`. The URL is checked with
/// an address in place of `{ip}`, and kept with `{ip}` in it.
fn validate_discovered_telemetry(
    loc: &Locator<'_>,
    tp: &KeyPath,
    mut raw: RawTelemetry,
) -> Result<TelemetryConfig, ConfigError> {
    if raw.source == "nvml" {
        return Err(loc.err(
            &tp.key("source"),
            "NVML reads GPUs on this host; discovered pods run elsewhere: use \"prometheus\" or \"agent\" with {ip} in the url",
        ));
    }
    let template = raw.url.clone();
    if let Some(u) = &template {
        if !u.contains(IP_PLACEHOLDER) {
            return Err(loc.err(
                &tp.key("url"),
                format!(
                    "{u:?} names no pod: write {IP_PLACEHOLDER} where each backend's address goes, \
                     like \"http://{IP_PLACEHOLDER}:8000/metrics\""
                ),
            ));
        }
        raw.url = Some(u.replace(IP_PLACEHOLDER, "192.0.2.1"));
    }
    let mut t = validate_telemetry(loc, tp, raw)?;
    if let (
        Some(template),
        TelemetryConfig::Prometheus { url, .. } | TelemetryConfig::Agent { url, .. },
    ) = (template, &mut t)
    {
        *url = template;
    }
    Ok(t)
}

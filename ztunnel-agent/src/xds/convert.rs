//! Conversions between istiod's resources (`istio.workload.Address`,
//! `istio.security.Authorization`) and the mesh state's types, which the local config file
//! also produces: both sources feed one state. Every problem names the field; the caller adds
//! the resource name. The reverse direction serves the development control plane.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::proto::security as pb_sec;
use crate::proto::workload as pb;
use crate::state::policy::{
    Action, Authorization, RbacMatch, Scope, ServiceAccountMatch, StringMatch,
};
use crate::state::service::{
    HealthPolicy, LoadBalancer, LoadBalancerMode, Scope as LbScope, Service,
};
use crate::state::workload::{
    ApplicationTunnel, GatewayAddress, HealthStatus, Locality, NetworkAddress, Protocol, Workload,
};

/// A resource that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(s: impl Into<String>) -> Invalid {
    Invalid(s.into())
}

fn ip_from_bytes(field: &str, b: &[u8]) -> Result<IpAddr, Invalid> {
    match b.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(b).map_err(|_| invalid(field))?,
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(b).map_err(|_| invalid(field))?,
        )),
        n => Err(invalid(format!(
            "{field} has {n} bytes: an address is 4 (IPv4) or 16 (IPv6) bytes"
        ))),
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn port(field: &str, p: u32) -> Result<u16, Invalid> {
    u16::try_from(p).map_err(|_| invalid(format!("{field} {p} is not a port (1-65535)")))
}

fn gateway(field: &str, g: &pb::GatewayAddress) -> Result<GatewayAddress, Invalid> {
    let destination = match &g.destination {
        Some(pb::gateway_address::Destination::Hostname(h)) => {
            format!("{}/{}", h.namespace, h.hostname)
        }
        Some(pb::gateway_address::Destination::Address(a)) => {
            let ip = ip_from_bytes(&format!("{field}.address"), &a.address)?;
            NetworkAddress {
                network: a.network.clone(),
                address: ip,
            }
            .to_string()
        }
        None => return Err(invalid(format!("{field} has no destination"))),
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port: match g.hbone_mtls_port {
            0 => ztunnel_common::HBONE_PORT,
            p => port(&format!("{field}.hboneMtlsPort"), p)?,
        },
    })
}

fn gateway_to_proto(g: &GatewayAddress) -> pb::GatewayAddress {
    let destination = match g.destination.parse::<NetworkAddress>() {
        Ok(a) => pb::gateway_address::Destination::Address(pb::NetworkAddress {
            network: a.network,
            address: ip_bytes(&a.address),
        }),
        Err(_) => {
            let (namespace, hostname) = g
                .destination
                .split_once('/')
                .unwrap_or(("", &g.destination));
            pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                namespace: namespace.to_string(),
                hostname: hostname.to_string(),
            })
        }
    };
    pb::GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: u32::from(g.hbone_mtls_port),
    }
}

/// A workload from xDS.
pub fn workload(w: &pb::Workload) -> Result<Workload, Invalid> {
    if w.uid.is_empty() {
        return Err(invalid("uid is empty"));
    }
    if w.namespace.is_empty() {
        return Err(invalid("namespace is empty"));
    }
    let workload_ips = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ip_from_bytes(&format!("addresses[{i}]"), a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        if !key.contains('/') {
            return Err(invalid(format!(
                "services key {key:?} is not namespace/hostname"
            )));
        }
        let mut ports = BTreeMap::new();
        for p in &list.ports {
            ports.insert(
                port(&format!("services[{key}].servicePort"), p.service_port)?,
                port(&format!("services[{key}].targetPort"), p.target_port)?,
            );
        }
        services.insert(key.clone(), ports);
    }
    let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(pb::TunnelProtocol::Hbone) => Protocol::HBONE,
        Ok(pb::TunnelProtocol::None) => Protocol::TCP,
        Ok(pb::TunnelProtocol::LegacyIstioMtls) | Err(_) => {
            return Err(invalid(format!(
                "tunnelProtocol {} is not supported: this agent speaks HBONE or plain TCP",
                w.tunnel_protocol
            )))
        }
    };
    let workload_type = match pb::WorkloadType::try_from(w.workload_type) {
        Ok(t) => t.as_str_name().to_lowercase(),
        Err(_) => String::new(),
    };
    Ok(Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        workload_ips,
        protocol,
        network_mode: match pb::NetworkMode::try_from(w.network_mode) {
            Ok(pb::NetworkMode::HostNetwork) => Some("HostNetwork".into()),
            _ => None,
        },
        trust_domain: w.trust_domain.clone(),
        service_account: w.service_account.clone(),
        network: w.network.clone(),
        workload_name: w.workload_name.clone(),
        workload_type,
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        hostname: w.hostname.clone(),
        node: w.node.clone(),
        native_tunnel: w.native_tunnel,
        application_tunnel: w.application_tunnel.as_ref().map(|t| ApplicationTunnel {
            protocol: pb::application_tunnel::Protocol::try_from(t.protocol)
                .ok()
                .map(|p| p.as_str_name().to_string()),
            port: u16::try_from(t.port).ok().filter(|p| *p != 0),
        }),
        waypoint: w
            .waypoint
            .as_ref()
            .map(|g| gateway("waypoint", g))
            .transpose()?,
        network_gateway: w
            .network_gateway
            .as_ref()
            .map(|g| gateway("networkGateway", g))
            .transpose()?,
        authorization_policies: w.authorization_policies.clone(),
        status: match pb::WorkloadStatus::try_from(w.status) {
            Ok(pb::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
            _ => HealthStatus::Healthy,
        },
        cluster_id: w.cluster_id.clone(),
        locality: w.locality.as_ref().map(|l| Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        }),
        capacity: w.capacity,
        services,
        netns: None,
    })
}

/// A workload as xDS carries it.
pub fn workload_to_proto(w: &Workload) -> pb::Workload {
    pb::Workload {
        uid: w.key(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.workload_ips.iter().map(ip_bytes).collect(),
        hostname: w.hostname.clone(),
        network: w.network.clone(),
        tunnel_protocol: match w.protocol {
            Protocol::HBONE => pb::TunnelProtocol::Hbone as i32,
            Protocol::TCP => pb::TunnelProtocol::None as i32,
        },
        trust_domain: w.trust_domain.clone(),
        service_account: w.service_account.clone(),
        waypoint: w.waypoint.as_ref().map(gateway_to_proto),
        network_gateway: w.network_gateway.as_ref().map(gateway_to_proto),
        node: w.node.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_type: pb::WorkloadType::from_str_name(&w.workload_type.to_uppercase())
            .unwrap_or(pb::WorkloadType::Deployment) as i32,
        workload_name: w.workload_name.clone(),
        native_tunnel: w.native_tunnel,
        application_tunnel: w
            .application_tunnel
            .as_ref()
            .map(|t| pb::ApplicationTunnel {
                protocol: t
                    .protocol
                    .as_deref()
                    .and_then(pb::application_tunnel::Protocol::from_str_name)
                    .unwrap_or(pb::application_tunnel::Protocol::None)
                    as i32,
                port: u32::from(t.port.unwrap_or(0)),
            }),
        services: w
            .services
            .iter()
            .map(|(key, ports)| {
                let ports = ports
                    .iter()
                    .map(|(s, t)| pb::Port {
                        service_port: u32::from(*s),
                        target_port: u32::from(*t),
                        app_protocol: 0,
                    })
                    .collect();
                (key.clone(), pb::PortList { ports })
            })
            .collect(),
        authorization_policies: w.authorization_policies.clone(),
        status: match w.status {
            HealthStatus::Healthy => pb::WorkloadStatus::Healthy as i32,
            HealthStatus::Unhealthy => pb::WorkloadStatus::Unhealthy as i32,
        },
        cluster_id: w.cluster_id.clone(),
        locality: w.locality.as_ref().map(|l| pb::Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        }),
        network_mode: match w.network_mode.as_deref() {
            Some("HostNetwork") => pb::NetworkMode::HostNetwork as i32,
            _ => pb::NetworkMode::Standard as i32,
        },
        extensions: Vec::new(),
        capacity: w.capacity,
    }
}

/// A service from xDS.
pub fn service(s: &pb::Service) -> Result<Service, Invalid> {
    if s.hostname.is_empty() || s.namespace.is_empty() {
        return Err(invalid("namespace and hostname must be set"));
    }
    let vips = s
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            Ok(NetworkAddress {
                network: a.network.clone(),
                address: ip_from_bytes(&format!("addresses[{i}]"), &a.address)?,
            })
        })
        .collect::<Result<Vec<_>, Invalid>>()?;
    let mut ports = BTreeMap::new();
    for (i, p) in s.ports.iter().enumerate() {
        ports.insert(
            port(&format!("ports[{i}].servicePort"), p.service_port)?,
            port(&format!("ports[{i}].targetPort"), p.target_port)?,
        );
    }
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips,
        ports,
        endpoints: BTreeMap::new(),
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s
            .waypoint
            .as_ref()
            .map(|g| gateway("waypoint", g))
            .transpose()?,
        load_balancer: s.load_balancing.as_ref().map(load_balancer).transpose()?,
        ip_families: None,
    })
}

/// A service's load balancing from xDS (unknown enum values are refused, naming the field).
fn load_balancer(lb: &pb::LoadBalancing) -> Result<LoadBalancer, Invalid> {
    use pb::load_balancing::{HealthPolicy as PbHealth, Mode, Scope as PbScope};
    let routing_preferences = lb
        .routing_preference
        .iter()
        .enumerate()
        .map(|(i, v)| match PbScope::try_from(*v) {
            Ok(PbScope::Region) => Ok(LbScope::Region),
            Ok(PbScope::Zone) => Ok(LbScope::Zone),
            Ok(PbScope::Subzone) => Ok(LbScope::Subzone),
            Ok(PbScope::Node) => Ok(LbScope::Node),
            Ok(PbScope::Cluster) => Ok(LbScope::Cluster),
            Ok(PbScope::Network) => Ok(LbScope::Network),
            _ => Err(invalid(format!(
                "loadBalancing.routingPreference[{i}] is {v}, not one of REGION, ZONE, SUBZONE, NODE, CLUSTER, NETWORK"
            ))),
        })
        .collect::<Result<Vec<_>, Invalid>>()?;
    let mode = match Mode::try_from(lb.mode) {
        Ok(Mode::UnspecifiedMode) => LoadBalancerMode::Standard,
        Ok(Mode::Strict) => LoadBalancerMode::Strict,
        Ok(Mode::Failover) => LoadBalancerMode::Failover,
        Ok(Mode::Passthrough) => LoadBalancerMode::Passthrough,
        Err(_) => {
            return Err(invalid(format!(
            "loadBalancing.mode is {}, not one of UNSPECIFIED_MODE, STRICT, FAILOVER, PASSTHROUGH",
            lb.mode
        )))
        }
    };
    let health_policy = match PbHealth::try_from(lb.health_policy) {
        Ok(PbHealth::OnlyHealthy) => HealthPolicy::OnlyHealthy,
        Ok(PbHealth::AllowAll) => HealthPolicy::AllowAll,
        Err(_) => {
            return Err(invalid(format!(
                "loadBalancing.healthPolicy is {}, not one of ONLY_HEALTHY, ALLOW_ALL",
                lb.health_policy
            )))
        }
    };
    Ok(LoadBalancer {
        routing_preferences,
        mode,
        health_policy,
    })
}

fn load_balancer_to_proto(lb: &LoadBalancer) -> pb::LoadBalancing {
    use pb::load_balancing::{HealthPolicy as PbHealth, Mode, Scope as PbScope};
    pb::LoadBalancing {
        routing_preference: lb
            .routing_preferences
            .iter()
            .map(|s| {
                (match s {
                    LbScope::Region => PbScope::Region,
                    LbScope::Zone => PbScope::Zone,
                    LbScope::Subzone => PbScope::Subzone,
                    LbScope::Node => PbScope::Node,
                    LbScope::Cluster => PbScope::Cluster,
                    LbScope::Network => PbScope::Network,
                }) as i32
            })
            .collect(),
        mode: (match lb.mode {
            LoadBalancerMode::Standard => Mode::UnspecifiedMode,
            LoadBalancerMode::Strict => Mode::Strict,
            LoadBalancerMode::Failover => Mode::Failover,
            LoadBalancerMode::Passthrough => Mode::Passthrough,
        }) as i32,
        health_policy: (match lb.health_policy {
            HealthPolicy::OnlyHealthy => PbHealth::OnlyHealthy,
            HealthPolicy::AllowAll => PbHealth::AllowAll,
        }) as i32,
        ..Default::default()
    }
}

/// A service as xDS carries it.
pub fn service_to_proto(s: &Service) -> pb::Service {
    pb::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s
            .vips
            .iter()
            .map(|v| pb::NetworkAddress {
                network: v.network.clone(),
                address: ip_bytes(&v.address),
            })
            .collect(),
        ports: s
            .ports
            .iter()
            .map(|(sp, tp)| pb::Port {
                service_port: u32::from(*sp),
                target_port: u32::from(*tp),
                app_protocol: 0,
            })
            .collect(),
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s.waypoint.as_ref().map(gateway_to_proto),
        load_balancing: s.load_balancer.as_ref().map(load_balancer_to_proto),
        ..Default::default()
    }
}

fn string_match(field: &str, m: &pb_sec::StringMatch) -> Result<StringMatch, Invalid> {
    use pb_sec::string_match::MatchType;
    match &m.match_type {
        Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
        Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
        Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
        Some(MatchType::Presence(_)) => Ok(StringMatch::Presence(Vec::new())),
        None => Err(invalid(format!("{field} has no match type"))),
    }
}

fn string_match_to_proto(m: &StringMatch) -> pb_sec::StringMatch {
    use pb_sec::string_match::MatchType;
    pb_sec::StringMatch {
        match_type: Some(match m {
            StringMatch::Exact(s) => MatchType::Exact(s.clone()),
            StringMatch::Prefix(s) => MatchType::Prefix(s.clone()),
            StringMatch::Suffix(s) => MatchType::Suffix(s.clone()),
            StringMatch::Presence(_) => MatchType::Presence(()),
        }),
    }
}

fn cidr(field: &str, a: &pb_sec::Address) -> Result<String, Invalid> {
    let ip = ip_from_bytes(field, &a.address)?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if a.length > max {
        return Err(invalid(format!(
            "{field} prefix length {} is longer than {max}",
            a.length
        )));
    }
    Ok(format!("{ip}/{}", a.length))
}

fn cidr_to_proto(s: &str) -> pb_sec::Address {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, len.parse().ok()),
        None => (s, None),
    };
    let ip: Option<IpAddr> = ip.parse().ok();
    let max = if ip.is_some_and(|i| i.is_ipv6()) {
        128
    } else {
        32
    };
    pb_sec::Address {
        address: ip.as_ref().map(ip_bytes).unwrap_or_default(),
        length: len.unwrap_or(max),
    }
}

/// An authorization policy from xDS.
pub fn authorization(a: &pb_sec::Authorization) -> Result<Authorization, Invalid> {
    if a.name.is_empty() {
        return Err(invalid("name is empty"));
    }
    let scope = match pb_sec::Scope::try_from(a.scope) {
        Ok(pb_sec::Scope::Global) => Scope::Global,
        Ok(pb_sec::Scope::Namespace) => Scope::Namespace,
        Ok(pb_sec::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(invalid(format!("scope {} is unknown", a.scope))),
    };
    let action = match pb_sec::Action::try_from(a.action) {
        Ok(pb_sec::Action::Allow) => Action::Allow,
        Ok(pb_sec::Action::Deny) => Action::Deny,
        Err(_) => return Err(invalid(format!("action {} is unknown", a.action))),
    };
    let mut rules = Vec::new();
    for (ri, rule) in a.rules.iter().enumerate() {
        let mut clauses = Vec::new();
        for (ci, clause) in rule.clauses.iter().enumerate() {
            let mut matches = Vec::new();
            for (mi, m) in clause.matches.iter().enumerate() {
                let at = format!("rules[{ri}].clauses[{ci}].matches[{mi}]");
                let strings = |name: &str, list: &[pb_sec::StringMatch]| {
                    list.iter()
                        .map(|s| string_match(&format!("{at}.{name}"), s))
                        .collect::<Result<Vec<_>, _>>()
                };
                let cidrs = |name: &str, list: &[pb_sec::Address]| {
                    list.iter()
                        .map(|c| cidr(&format!("{at}.{name}"), c))
                        .collect::<Result<Vec<_>, _>>()
                };
                let ports = |name: &str, list: &[u32]| {
                    list.iter()
                        .map(|p| port(&format!("{at}.{name}"), *p))
                        .collect::<Result<Vec<_>, _>>()
                };
                let accounts = |list: &[pb_sec::ServiceAccountMatch]| {
                    list.iter()
                        .map(|s| ServiceAccountMatch {
                            namespace: s.namespace.clone(),
                            service_account: s.service_account.clone(),
                        })
                        .collect()
                };
                matches.push(RbacMatch {
                    namespaces: strings("namespaces", &m.namespaces)?,
                    not_namespaces: strings("notNamespaces", &m.not_namespaces)?,
                    principals: strings("principals", &m.principals)?,
                    not_principals: strings("notPrincipals", &m.not_principals)?,
                    service_accounts: accounts(&m.service_accounts),
                    not_service_accounts: accounts(&m.not_service_accounts),
                    source_ips: cidrs("sourceIps", &m.source_ips)?,
                    not_source_ips: cidrs("notSourceIps", &m.not_source_ips)?,
                    destination_ips: cidrs("destinationIps", &m.destination_ips)?,
                    not_destination_ips: cidrs("notDestinationIps", &m.not_destination_ips)?,
                    destination_ports: ports("destinationPorts", &m.destination_ports)?,
                    not_destination_ports: ports("notDestinationPorts", &m.not_destination_ports)?,
                });
            }
            clauses.push(matches);
        }
        rules.push(clauses);
    }
    Ok(Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope,
        action,
        rules,
        dry_run: a.dry_run,
    })
}

/// An authorization policy as xDS carries it.
pub fn authorization_to_proto(a: &Authorization) -> pb_sec::Authorization {
    let strings = |l: &[StringMatch]| l.iter().map(string_match_to_proto).collect();
    let cidrs = |l: &[String]| l.iter().map(|c| cidr_to_proto(c)).collect();
    let ports = |l: &[u16]| l.iter().map(|p| u32::from(*p)).collect();
    let accounts = |l: &[ServiceAccountMatch]| {
        l.iter()
            .map(|s| pb_sec::ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    pb_sec::Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope: match a.scope {
            Scope::Global => pb_sec::Scope::Global,
            Scope::Namespace => pb_sec::Scope::Namespace,
            Scope::WorkloadSelector => pb_sec::Scope::WorkloadSelector,
        } as i32,
        action: match a.action {
            Action::Allow => pb_sec::Action::Allow,
            Action::Deny => pb_sec::Action::Deny,
        } as i32,
        rules: a
            .rules
            .iter()
            .map(|clauses| pb_sec::Rule {
                clauses: clauses
                    .iter()
                    .map(|matches| pb_sec::Clause {
                        matches: matches
                            .iter()
                            .map(|m| pb_sec::Match {
                                namespaces: strings(&m.namespaces),
                                not_namespaces: strings(&m.not_namespaces),
                                principals: strings(&m.principals),
                                not_principals: strings(&m.not_principals),
                                source_ips: cidrs(&m.source_ips),
                                not_source_ips: cidrs(&m.not_source_ips),
                                destination_ips: cidrs(&m.destination_ips),
                                not_destination_ips: cidrs(&m.not_destination_ips),
                                destination_ports: ports(&m.destination_ports),
                                not_destination_ports: ports(&m.not_destination_ports),
                                service_accounts: accounts(&m.service_accounts),
                                not_service_accounts: accounts(&m.not_service_accounts),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
        dry_run: a.dry_run,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn upstream_example_round_trips_through_the_protos() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/upstream-localhost.yaml");
        let config = crate::xds::local::load(&path).expect("fixture loads");
        for w in &config.workloads {
            let back = workload(&workload_to_proto(w)).expect("valid");
            let mut expected = w.clone();
            expected.uid = w.key();
            expected.workload_type = if w.workload_type.is_empty() {
                "deployment".into()
            } else {
                w.workload_type.clone()
            };
            assert_eq!(back, expected);
        }
        for s in &config.services {
            let mut expected = s.clone();
            expected.endpoints.clear();
            expected.ip_families = None;
            assert_eq!(service(&service_to_proto(s)).expect("valid"), expected);
        }
        for p in &config.policies {
            assert_eq!(
                &authorization(&authorization_to_proto(p)).expect("valid"),
                p
            );
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let mut w = workload_to_proto(&Workload {
            uid: "u".into(),
            name: "a".into(),
            namespace: "default".into(),
            ..Default::default()
        });
        w.addresses = vec![vec![10, 0, 0, 1, 7]];
        let err = workload(&w).expect_err("5-byte address").to_string();
        assert!(err.contains("addresses[0] has 5 bytes"), "{err}");
        w.addresses.clear();
        w.services.insert(
            "default/x".into(),
            pb::PortList {
                ports: vec![pb::Port {
                    service_port: 70000,
                    target_port: 80,
                    app_protocol: 0,
                }],
            },
        );
        let err = workload(&w).expect_err("port").to_string();
        assert!(err.contains("servicePort 70000"), "{err}");
    }
}
